"""Fine-tuning a pruned multi-domain network: every weight, BatchNorm and head
trains, the filters each domain uses stay as they are.

What a network needs after :func:`fastmdl.prune`, :func:`fastmdl.pagcp` or
uniform pruning has taken filters away; mask training under a budget is
:func:`fastmdl.train`.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import count as _count, positive as _positive
from .train import _check_labels, _check_loaders, _progress, mixed_batches, recalibrate_bn


def finetune(model: nn.Module, train_loaders: Sequence, steps: int, *, lr: float = 1e-3,
             recalibrate: int = 20, checkpoints: Iterable[int] = (),
             callback: Optional[Callable[[int, nn.Module], None]] = None,
             progress: bool = True) -> List[float]:
    r"""Train ``model`` (a :class:`fastmdl.MultiDomainModel` or
    :class:`fastmdl.PrunedModel`) in place for ``steps`` Adam steps at ``lr``, each
    on one mixed batch with the next batch of every domain's loader
    (``train_loaders[d]``), minimising

    .. math:: \mathrm{CE}(\mathrm{model}(x, domain), y)

    over every parameter that requires a gradient, except mask scores: no filter
    is switched on or off. BatchNorm trains as in the unpruned network, with each
    domain's batch statistics; in a PrunedModel, whose BatchNorms are folded into
    the convolutions, through :meth:`PrunedModel.batchnorm_training` (where it kept
    its statistics; where it did not, the folded scale and shift train as they
    are). Afterwards the running statistics are recomputed over ``recalibrate``
    batches per domain (:func:`recalibrate_bn`; 0: kept as the momentum left them,
    which lags the moving weights) and the model is left in eval mode.

    ``callback(k, net)`` is called after each step count ``k`` in ``checkpoints``
    (0 to ``steps``) with the network as this function would return it had it
    stopped there (a recalibrated copy in eval mode; after the last step the
    model itself), e.g. to report accuracy against fine-tune length in one run.
    Returns the loss of each step."""
    from .convert import MultiDomainModel
    from .pruned import PrunedModel

    if not isinstance(model, (MultiDomainModel, PrunedModel)):
        raise TypeError("model must be a fastmdl.MultiDomainModel or fastmdl.PrunedModel, got "
                        f"{type(model).__name__}")
    steps = _count(steps, "steps")
    recalibrate = _count(recalibrate, "recalibrate")
    _positive(lr, "lr")
    marks = sorted({_count(k, "checkpoints") for k in checkpoints})
    if marks and marks[-1] > steps:
        raise ValueError(f"checkpoints must lie in [0, steps={steps}], got {marks[-1]}")
    if marks and not callable(callback):
        raise TypeError("checkpoints need a callback(k, net), got callback="
                        f"{type(callback).__name__}")
    _check_loaders(train_loaders, "train_loaders", model.num_domains)
    params = [p for n, p in model.named_parameters()
              if p.requires_grad and n.rsplit(".", 1)[-1] != "scores"]
    if not params:
        raise ValueError("model has no trainable parameter besides mask scores")

    unfold = (model.batchnorm_training
              if isinstance(model, PrunedModel) and model.has_bn_stats
              else contextlib.nullcontext)
    has_stats = not isinstance(model, PrunedModel) or model.has_bn_stats

    def settled(net: nn.Module) -> nn.Module:
        if recalibrate and has_stats:
            recalibrate_bn(net, train_loaders, recalibrate)
        return net.eval()

    opt = torch.optim.Adam(params, lr=lr)
    device = params[0].device
    classes = list(model.num_classes)
    batches = mixed_batches(train_loaders,
                            check=lambda d, y: _check_labels(y, classes[d], d))
    bar = iter(_progress(range(steps), progress, "fine-tuning"))
    losses: List[float] = []
    for end in [k for k in marks if k < steps] + [steps]:
        # Left at each checkpoint: the copy handed to the callback is folded.
        with unfold():
            model.train()
            while len(losses) < end:
                next(bar, None)
                x, y, dom = (t.to(device) for t in next(batches))
                loss = F.cross_entropy(model(x, dom), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
        if end < steps:
            callback(end, settled(copy.deepcopy(model)))
    next(bar, None)  # past the end: closes the progress bar
    settled(model)
    if marks and marks[-1] == steps:
        callback(steps, model)
    return losses

