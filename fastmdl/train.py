"""``fastmdl.train``: learn per-domain masks under a budget on mixed-domain batches."""

from __future__ import annotations

import io
import itertools
import os
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import _dist, _domain
from ._io import write_atomic_bytes
from .budget import BudgetLoss
from .convert import MultiDomainModel
from .cost import costs, multidomain_layers
from .masks import hard_mask

CHECKPOINT_FORMAT = "fastmdl.train-checkpoint"


def train(model: MultiDomainModel, train_loaders: Sequence, val_loaders: Optional[Sequence] = None,
          *, budget: float = 1.0, epochs: int = 1, metric: str = "flops",
          sharing: Optional[str] = None, sharing_weight: Union[str, float] = "learnable",
          budget_weight: float = 1.0, dual_lr: float = 1.0, lr: float = 1e-3,
          mask_lr: float = 1e-2, sharing_lr: float = 0.05,
          train_weights: bool = False, device: Union[str, torch.device, None] = None,
          checkpoint: Union[str, os.PathLike, None] = None, resume: bool = True,
          progress: bool = True, log: Optional[Callable[[str], None]] = print,
          anneal: float = 0.6, recalibrate: int = 20, fill: bool = True) -> List[Dict]:
    r"""Train ``model``'s masks, per-domain BatchNorms and heads (and, with
    ``train_weights``, the shared weights) under a budget.

    Each step takes one batch ``(x, y)`` from every domain's loader
    (``train_loaders[d]``), runs them as one mixed batch and minimises

    .. math:: \mathrm{CE}(\mathrm{model}(x, domain), y) + \mathrm{BudgetLoss}()

    The budget the loss enforces falls linearly from 1 to ``budget`` over the
    first ``anneal`` fraction of the steps (0: the full budget from the start),
    with plain SGD on the mask scores (step ``mask_lr`` / c, c the cost of a
    typical filter as a fraction of the baseline) and Adam at ``lr`` on the rest,
    except a learnable sharing weight, which Adam steps at ``sharing_lr`` (its
    optimum 1/S moves as the masks do; at ``lr`` it would barely move).
    The budget loss's gradient on each group's scores is rescaled by c over the
    cost of one of that group's filters (see :func:`filter_costs`), so the budget
    pulls every filter down at the same pace and the task gradient decides which
    go; unscaled, the costliest filters (the first stage's residual stream, at
    full resolution) go first whatever they are worth, and the network with them.
    ``budget_weight`` and ``dual_lr`` go to :class:`BudgetLoss`. An epoch is as
    many steps as the longest loader has batches; shorter loaders start over.
    After each epoch it evaluates on ``val_loaders`` (if given), logs each domain's
    accuracy and cost (a fraction of the baseline), and, with ``checkpoint``,
    writes model, optimiser and history there atomically; a later call with the
    same path resumes after the last finished epoch (``resume=False`` starts over).

    With ``fill``, at the step where the annealed budget reaches its target, each
    domain that has fallen below it gets filters back until it reaches it
    (:func:`fill_budget`: those another domain keeps first, so the union network
    grows last): a mask step can switch off more than the budget asks for, and
    the slack is accuracy given away. The rest of training adapts to the filters
    that came back (measured: filling after the last step instead, with no
    steps to adapt, cost up to 40 points on some domains; RESULTS.md).

    At the end of each epoch, the BatchNorm statistics are recomputed with the
    epoch's final masks and weights over ``recalibrate`` batches of each domain
    (statistics averaged while the masks moved do not describe the network that
    is evaluated and pruned).

    Under ``torchrun`` (``torch.distributed`` initialised with more than one
    rank), the same call trains data-parallel: the model is wrapped in
    DistributedDataParallel, each rank passes loaders over ITS share of the data
    (e.g. with a ``DistributedSampler``), and the global batch is the union of the
    ranks' batches. Each domain's BatchNorm statistics are summed over the ranks
    (differentiably) and the loss is the global batch's mean, so W ranks compute
    what one process would on the global batch, up to rounding; accuracies are
    counted over all ranks, only rank 0 logs and writes checkpoints.

    Returns one dict per epoch: ``epoch``, ``loss``, ``train_acc``, ``val_acc``
    (lists over domains), ``cost`` (per-domain fractions), ``union`` and the
    budget loss's parts.
    """
    if not isinstance(model, MultiDomainModel):
        raise TypeError(f"model must be a fastmdl.MultiDomainModel, got {type(model).__name__}")
    num_domains = model.num_domains
    _check_loaders(train_loaders, "train_loaders", num_domains)
    if val_loaders is not None:
        _check_loaders(val_loaders, "val_loaders", num_domains)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if isinstance(sharing_lr, bool) or not isinstance(sharing_lr, (int, float)) \
            or not sharing_lr > 0:
        raise ValueError(f"sharing_lr must be a positive number, got {sharing_lr!r}")
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    _adopt_training_size(model, train_loaders, log)
    loss_fn = BudgetLoss(model, budget, metric, sharing, sharing_weight,
                         budget_weight=budget_weight, dual_lr=dual_lr).to(device)

    scores = {id(g.scores): g.scores for g in model.mask_groups()}
    shared = _shared_weights(model)
    shared_ids = {id(p) for p in shared}
    was_trainable = [p.requires_grad for p in shared]
    for p in shared:
        p.requires_grad_(train_weights)
    rank, world_size = _dist.world()
    net = model
    if world_size > 1:
        # Each rank runs its own share of the global batch; DDP averages the task
        # gradients (the loss below is scaled so that this is the global mean's
        # gradient). BatchNorm statistics are summed over the ranks inside the
        # layers, so buffers need no broadcast.
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    if rank != 0:
        progress, log = False, None
    rest = [p for p in model.parameters() if id(p) not in scores and
            (train_weights or id(p) not in shared_ids)]
    sharing_group = ([{"params": [loss_fn.sharing_param], "lr": sharing_lr}]
                     if loss_fn.sharing_param is not None else [])
    group_scores = [g.scores for g in model.mask_groups()]
    cost_each = filter_costs(model, metric)
    widths = [g.width for g in model.mask_groups()]
    typical = sum(c * w for c, w in zip(cost_each, widths)) / sum(widths)
    # The budget's gradient on a group's scores is rescaled by typical / its filter
    # cost, so every filter is pulled down at the pace of a typical one.
    precondition = [typical / c for c in cost_each]
    optimizer = _Optimizers(torch.optim.SGD(group_scores, lr=mask_lr / typical),
                            torch.optim.Adam([{"params": rest}] + sharing_group, lr=lr))

    history: List[Dict] = []
    start = 0
    if checkpoint is not None and resume and os.path.exists(checkpoint):
        start, history = _load_checkpoint(checkpoint, model, optimizer, loss_fn)
        if log and start < epochs:
            log(f"resuming from {os.fspath(checkpoint)} after epoch {start}")

    steps = int(_dist.reduce_host([max(len(loader) for loader in train_loaders)], "max")[0])
    if isinstance(anneal, bool) or not isinstance(anneal, (int, float)) or not 0 <= anneal <= 1:
        raise ValueError(f"anneal must be a fraction in [0, 1], got {anneal!r}")
    ramp = max(1, round(anneal * epochs * steps))
    for epoch in range(start, epochs):
        model.train()
        for loader in train_loaders:  # a DistributedSampler reshuffles per epoch only if told
            if hasattr(getattr(loader, "sampler", None), "set_epoch"):
                loader.sampler.set_epoch(epoch)
        batches = mixed_batches(train_loaders, check=lambda d, y: _check_labels(
            y, model.num_classes[d], d))
        correct = torch.zeros(num_domains)
        seen = torch.zeros(num_domains)
        task_sum = penalty_sum = 0.0
        bar = _progress(range(steps), progress, f"epoch {epoch + 1}/{epochs}")
        for i in bar:
            # The budget falls from 1 to its target over the first `anneal` of
            # training: a few filters at a time, while the rest adapt.
            t = min(1.0, (epoch * steps + i + 1) / ramp)
            loss_fn.budget = 1.0 - (1.0 - budget) * t
            x, y, dom = (t.to(device) for t in next(batches))
            with _dist.sync_batchnorm():
                logits = net(x, dom)
            # The mean over the GLOBAL batch (every rank's samples), times the
            # world size because DDP averages the ranks' gradients.
            global_n = _dist.reduce_host([len(y)])[0] if world_size > 1 else len(y)
            task = F.cross_entropy(logits, y, reduction="sum") * (world_size / global_n)
            optimizer.zero_grad(set_to_none=True)
            task.backward()
            penalty = loss_fn()
            extra = [loss_fn.sharing_param] if loss_fn.sharing_param is not None else []
            grads = torch.autograd.grad(penalty, group_scores + extra, allow_unused=True)
            for p, g, k in zip(group_scores + extra, grads, precondition + [1.0] * len(extra)):
                if g is not None:
                    p.grad = g * k if p.grad is None else p.grad + g * k
            optimizer.step()
            if fill and epoch * steps + i + 1 == ramp:
                fill_budget(model, budget, metric)
            loss = task.detach() / world_size + penalty.detach()
            with torch.no_grad():
                hit = (logits.argmax(1) == y).float().cpu()
                correct.index_add_(0, dom.cpu(), hit)
                seen.index_add_(0, dom.cpu(), torch.ones_like(hit))
            task_sum += float(task.detach()) / world_size
            penalty_sum += float(penalty.detach())
            if hasattr(bar, "set_postfix"):
                parts = loss_fn.parts()
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}",
                                cost=" ".join(f"{c:.2f}" for c in parts["cost"]))
        recalibrate_bn(model, train_loaders, batches=recalibrate, sync=True)
        with torch.no_grad():
            cost = costs(multidomain_layers(model, hard=True), metric)
        counts = _dist.reduce_host([task_sum, *correct.tolist(), *seen.tolist()])
        correct = torch.tensor(counts[1:1 + num_domains])
        seen = torch.tensor(counts[1 + num_domains:])
        val_acc = None
        if val_loaders is not None:
            hits, total = _evaluate_counts(model, val_loaders)
            both = _dist.reduce_host(hits + total)
            val_acc = [h / max(t, 1) for h, t in zip(both[:num_domains], both[num_domains:])]
        record = {
            "epoch": epoch + 1, "loss": (counts[0] + penalty_sum) / steps,
            "train_acc": (correct / seen.clamp(min=1)).tolist(),
            "val_acc": val_acc,
            "cost": (cost.per_domain / cost.baseline).tolist(),
            "union": float(cost.union / cost.baseline.mean()),
            "budget_loss": loss_fn.parts(),
        }
        history.append(record)
        if log:
            log(_format(record, metric))
        if checkpoint is not None:
            if rank == 0:
                _save_checkpoint(checkpoint, epoch + 1, model, optimizer, loss_fn, history)
            _dist.barrier()
    for p, flag in zip(shared, was_trainable):
        p.requires_grad_(flag)
    model.eval()
    return history


@torch.no_grad()
def recalibrate_bn(model, loaders: Sequence, batches: int = 20, *, sync: bool = False) -> None:
    """Recompute every per-domain BatchNorm's running statistics as the plain
    average over up to ``batches`` batches of each domain's loader, with the
    current masks and weights (nothing else changes; 0 does nothing).

    With ``sync`` under ``torch.distributed`` (every rank must call it), each
    batch's statistics are taken over all ranks' batches together, and every rank
    runs as many batches as the shortest rank can.

    A :class:`fastmdl.PrunedModel` is recalibrated through the statistics each
    folded BatchNorm kept (:meth:`PrunedModel.calibrating`): the same result as
    recalibrating before ``fastmdl.prune``, up to float rounding. It raises
    ``TypeError`` if the model kept none, and ``ValueError`` with ``sync``."""
    from .layers import BatchNorm2d
    from .pruned import PrunedModel

    if batches <= 0:
        return
    per_domain = [min(batches, len(loader)) for loader in loaders]
    if isinstance(model, PrunedModel):
        if sync:
            raise ValueError("sync=True is not supported for a PrunedModel: recalibrate on "
                             "one process and broadcast the model")
        device = next(model.parameters()).device
        with model.calibrating():
            for d, loader in enumerate(loaders):
                for x, _ in itertools.islice(iter(loader), per_domain[d]):
                    model(x.to(device), d)
        return
    if sync:
        per_domain = [int(v) for v in _dist.reduce_host(per_domain, "min")]
    bns = [m for m in model.modules() if isinstance(m, BatchNorm2d)]
    saved = [(m.momentum, m.training) for m in bns]
    was_training = model.training
    device = next(model.parameters()).device
    for m in bns:
        m.momentum = None  # cumulative average
        m.running_mean.zero_()
        m.running_var.fill_(1.0)
        m.num_batches_tracked.zero_()
    model.train()
    with _dist.sync_batchnorm(sync):
        for d, loader in enumerate(loaders):
            for x, _ in itertools.islice(iter(loader), per_domain[d]):
                model(x.to(device), d)
    for m, (momentum, _) in zip(bns, saved):
        m.momentum = momentum
    model.train(was_training)


@torch.no_grad()
def evaluate(model, loaders: Sequence) -> List[float]:
    """Accuracy of ``model`` on each domain's loader (``loaders[d]`` for domain d)."""
    hits, seen = _evaluate_counts(model, loaders)
    return [h / max(n, 1) for h, n in zip(hits, seen)]


@torch.no_grad()
def _evaluate_counts(model, loaders: Sequence):
    """(correct predictions, samples) per domain."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits, seen = [], []
    for d, loader in enumerate(loaders):
        correct = total = 0
        for x, y in loader:
            pred = model(x.to(device), d).argmax(1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
        hits.append(correct)
        seen.append(total)
    model.train(was_training)
    return hits, seen


class _Optimizers:
    """SGD for the mask scores, Adam for the rest, stepped together.

    SGD (without momentum) moves a score in proportion to its gradient, so filters
    flip in the order of what they cost against what they are worth; Adam's
    per-parameter normalisation, or momentum, moves every over-budget score at
    about the same rate and flips them all at once, far past the budget."""

    def __init__(self, masks: torch.optim.Optimizer, rest: torch.optim.Optimizer):
        self.masks, self.rest = masks, rest

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.masks.zero_grad(set_to_none)
        self.rest.zero_grad(set_to_none)

    def step(self) -> None:
        self.masks.step()
        self.rest.step()

    def state_dict(self) -> Dict:
        return {"masks": self.masks.state_dict(), "rest": self.rest.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        self.masks.load_state_dict(state["masks"])
        self.rest.load_state_dict(state["rest"])


@torch.no_grad()
def fill_budget(model: MultiDomainModel, budget: float, metric: str = "flops") -> List[int]:
    r"""Switch filters back on, per domain, while the domain's cost stays within
    ``budget`` (a fraction of the baseline); returns how many each domain got.

    Training pushes masks down in steps, and a step can switch off more filters
    than the budget asks for. This hands the slack back: domain d's switched-off
    filters (a grouped convolution's: whole groups) are taken in order, first those
    another domain already keeps (they add nothing to the union network), each set
    by score (the closest to switching back on first), and the longest prefix whose cost :math:`r_d \le` ``budget``
    is switched on (cost grows with every filter, so a bisection finds it).
    A domain already over the budget is left as it is."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
    groups = model.mask_groups()
    added = []
    for d in range(model.num_domains):
        def ratio() -> float:
            c = costs(multidomain_layers(model, hard=True), metric)
            return float(c.per_domain[d] / c.baseline[d])

        if ratio() > budget:
            added.append(0)
            continue
        candidates = []
        for gi, g in enumerate(groups):
            on = hard_mask(g.scores.detach(), g.block)[:, ::g.block]  # one per block
            others = on.clone()
            others[d] = False
            shared = others.any(0)
            means = g.scores.detach()[d].reshape(-1, g.block).mean(1)
            for j in (~on[d]).nonzero().flatten().tolist():
                candidates.append((not bool(shared[j]), -float(means[j]), gi, j))
        candidates.sort()
        saved = [g.scores.data[d].clone() for g in groups]
        # A switched-on filter gets a small positive score: just past the threshold.
        on_value = 1e-3

        def apply(k: int) -> None:
            for g, row in zip(groups, saved):
                g.scores.data[d] = row
            for _, _, gi, j in candidates[:k]:
                b = groups[gi].block  # a grouped conv's channels come back a group at a time
                groups[gi].scores.data[d, j * b:(j + 1) * b] = on_value

        lo, hi = 0, len(candidates)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            apply(mid)
            if ratio() <= budget:
                lo = mid
            else:
                hi = mid - 1
        apply(lo)
        added.append(lo)
    return added


def filter_costs(model: MultiDomainModel, metric: str = "flops") -> List[float]:
    r"""For each mask group, what one of its filters costs at the current masks:
    the mean over its filters and the domains of :math:`\partial r_d / \partial m`,
    with :math:`r_d` domain d's cost as a fraction of the baseline (floored at
    1e-6, for groups whose filters cost nothing)."""
    groups = model.mask_groups()
    scores = [g.scores for g in groups]
    c = costs(multidomain_layers(model), metric)
    ratio = (c.per_domain / c.baseline).mean()
    grads = torch.autograd.grad(ratio, scores, allow_unused=True)
    return [max(float(gr.mean()) if gr is not None else 0.0, 1e-6) for gr in grads]


def _shared_weights(model: MultiDomainModel) -> List[torch.nn.Parameter]:
    """Parameters every domain shares: all but the masks, BatchNorms and heads."""
    from .conv_heads import ConvHeads
    from .layers import BatchNorm2d, Conv2d, DomainHeads

    own = set()
    for m in model.modules():
        if isinstance(m, (BatchNorm2d, DomainHeads, ConvHeads)):
            own.update(id(p) for p in m.parameters())
        elif isinstance(m, Conv2d):
            own.add(id(m.scores))
    return [p for p in model.parameters() if id(p) not in own]


def _check_loaders(loaders, name: str, num_domains: int) -> None:
    _domain.check_per_domain(loaders, name, num_domains)
    for d, loader in enumerate(loaders):
        if not hasattr(loader, "__iter__") or not hasattr(loader, "__len__"):
            raise TypeError(f"{name}[{d}] must be an iterable with a length (a DataLoader)")
        if len(loader) == 0:
            raise ValueError(f"{name}[{d}] is empty")


def _check_labels(y, num_classes: int, d: int) -> None:
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64:
        raise TypeError(f"labels of domain {d} must be an int64 tensor, got "
                        f"{getattr(y, 'dtype', type(y).__name__)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels of domain {d} must lie in [0, {num_classes}), got values in "
                         f"[{int(y.min())}, {int(y.max())}]")


def mixed_batches(loaders: Sequence, check: Optional[Callable[[int, torch.Tensor], None]] = None
                  ) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless mixed-domain batches ``(x, y, domain)``: the next batch of every
    domain's loader (``loaders[d]``, restarted when it runs out), concatenated in
    domain order, with ``domain`` the int64 domain id of each sample. ``check(d, y)``
    sees each domain's labels before they are concatenated."""
    iters = [itertools.chain.from_iterable(itertools.repeat(loader)) for loader in loaders]
    while True:
        xs, ys, ds = [], [], []
        for d, it in enumerate(iters):
            x, y = next(it)
            if check is not None:
                check(d, y)
            xs.append(x)
            ys.append(y)
            ds.append(torch.full((len(y),), d, dtype=torch.int64))
        yield torch.cat(xs), torch.cat(ys), torch.cat(ds)


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, leave=False)


def _format(r: Dict, metric: str) -> str:
    def pct(v):
        return " ".join(f"{100 * a:5.1f}" for a in v)

    line = (f"epoch {r['epoch']}: loss {r['loss']:.4f} | train acc % [{pct(r['train_acc'])}]")
    if r["val_acc"] is not None:
        line += f" | val acc % [{pct(r['val_acc'])}]"
    return line + f" | {metric} % of baseline [{pct(r['cost'])}] union {100 * r['union']:.1f}"


def _save_checkpoint(path, epoch, model, optimizer, loss_fn, history) -> None:
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "epoch": epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "budget_loss": loss_fn.state_dict(),
                "history": history}, buf)
    write_atomic_bytes(path, buf.getvalue())


def _load_checkpoint(path, model, optimizer, loss_fn):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {os.fspath(path)} cannot be read ({type(e).__name__}: {e}); "
                         "delete it or pass resume=False") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a fastmdl training checkpoint")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loss_fn.load_state_dict(state["budget_loss"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {os.fspath(path)} does not match this model or these "
                         f"settings: {e}") from e
    return int(state["epoch"]), list(state["history"])


def _adopt_training_size(model: MultiDomainModel, loaders: Sequence, log) -> None:
    """A model converted without ``input_size`` is costed (and its pruned network
    served) at the size of the images it trains on: read (C, H, W) off the first
    loader's dataset, without drawing a batch (a loader may be a one-shot iterable).
    Several sizes among the domains, or no dataset to look at, leave the size
    assumed, and the log says so."""
    if model.input_size_source != "assumed":
        return
    sizes = set()
    for loader in loaders:
        dataset = getattr(loader, "dataset", None)
        try:
            item = dataset[0]
            image = item[0] if isinstance(item, (tuple, list)) else item
            sizes.add(tuple(image.shape))
        except Exception:  # any indexable Dataset will do; anything else tells us nothing
            sizes.add(None)
    if len(sizes) == 1 and None not in sizes:
        size = sizes.pop()
        if len(size) == 3 and size[0] == model.input_size[0]:
            model.set_input_size(size, "trained")
            return
    if log:
        log(f"note: costs are counted at the assumed input size {model.input_size}; the "
            "training images' size could not be read off the loaders' datasets (pass "
            "input_size= to fastmdl.convert)")
