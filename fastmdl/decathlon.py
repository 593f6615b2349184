"""``fastmdl decathlon``: the budget-aware pruning protocol of dos Santos et al.
(arXiv 2210.08101, 2309.11464) on a Visual Decathlon devkit the user has.

For each budget (1.0 first): a ResNet-26 converted for the domains, its masks,
per-domain BatchNorms and heads trained on every domain's train split at once
(:func:`fastmdl.train`), pruned (:func:`fastmdl.prune`) and evaluated on every
domain's val split (the devkit's test labels are not public). Each row gets the
decathlon score against the budget-1.0 model,

    S = sum_d 1000 max(0, Emax_d - E_d)^2 / Emax_d^2,   Emax_d = 2 E_d(budget 1.0),

with E_d the val error (a fraction) of domain d, and the params and FLOPs of the
pruned network against one single-domain ResNet-26. Writes decathlon.md and
decathlon.json.

Where the settings come from:

- the papers (as their abstracts, and the issue, state them): the ResNet-26 of the
  Decathlon (:func:`fastmdl.models.resnet26`, ImageNet-pretrained where you have
  the weights: ``backbone``); the budgets 1.0, 0.75, 0.5, 0.25; the
  parameter-sharing losses (intersection, union, Jaccard) with a learnable
  weight; params and multiply-adds of the pruned network; the decathlon score;
- the Decathlon papers' public code, not these papers: the preprocessing
  (shorter side 72, random 64 x 64 crops and flips for training except gtsrb,
  omniglot and svhn, the 72 x 72 centre for evaluation, the devkit's per-domain
  mean and std; :func:`fastmdl.data.decathlon_domain` with ``preprocess="devkit"``);
- fastmdl's defaults, NOT checked against the papers (we do not have their
  training details at hand; set them yourself if you do): the optimisers (SGD on
  the mask scores at ``mask_lr`` 1e-2, Adam at ``lr`` 1e-3 on the rest), the
  budget annealed over the first 60% of the steps, :func:`fastmdl.fill_budget`,
  BatchNorm recalibration, the number of epochs, the batch size, the Jaccard loss
  as the default sharing loss, the budget counted on FLOPs (multiply-adds) at
  64 x 64, frozen shared weights when a pretrained backbone is given (trained
  ones without), and the budget-1.0 model of this run as the reference of the
  score. The challenge's own Emax_d come from Rebuffi et al.'s fine-tuned
  per-domain networks, so scores here compare the rows of one report with each
  other, not with published numbers.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Subset

from ._io import write_report
from .budget import SHARING as _BUDGET_SHARING
from .experiment import pruned_row, score_rows

#: The ten Visual Decathlon domains, as the devkit names its annotation files.
DOMAINS = ("aircraft", "cifar100", "daimlerpedcls", "dtd", "gtsrb", "imagenet12", "omniglot",
           "svhn", "ucf101", "vgg-flowers")
BUDGETS = (1.0, 0.75, 0.5, 0.25)
SHARING = tuple(s for s in _BUDGET_SHARING if s is not None)  # the losses, by name
TRAIN_SIZE, EVAL_SIZE, RESIZE_TO = 64, 72, 72
# A domain's FLOPs fraction may exceed its budget by this much (rounding) before
# the report says the budget was not reached.
BUDGET_SLACK = 0.005


def run(root: str, out_dir: str = "fastmdl-decathlon", *, domains: Sequence[str] = DOMAINS,
        budgets: Sequence[float] = BUDGETS, sharing: Optional[str] = "jaccard", epochs: int = 5,
        batch_size: int = 32, width: float = 1.0,
        backbone: Union[str, os.PathLike, None] = None, train_weights: Optional[bool] = None,
        max_train: Optional[int] = None, max_eval: Optional[int] = None, workers: int = 0,
        device: Optional[str] = None, seed: int = 0, progress: bool = True,
        log: Optional[Callable[[str], None]] = print) -> Dict:
    """Run the protocol (module docstring) on the devkit at ``root`` and write
    ``out_dir``/decathlon.md and .json; returns the report dict.

    ``budgets`` run from the largest down and always include 1.0 (added if
    missing: it is the score's reference); ``sharing`` is one of "intersection",
    "union", "jaccard" or None, used below budget 1.0. ``width`` scales ResNet-26's
    filters; ``backbone`` is a file written by ``torch.save(state_dict)`` of
    ``fastmdl.models.resnet26(num_classes=K, width=width)`` (loaded with
    ``weights_only=True``). ``train_weights`` (default: only when there is no
    ``backbone``) trains the shared weights with the masks. ``max_train`` /
    ``max_eval`` cap each domain's train / val images (a seeded random subset).
    An epoch is as many mixed-domain steps (one batch of ``batch_size`` from each
    domain) as the largest domain has batches. ``workers`` DataLoader processes
    read images; ``device`` defaults to CUDA where available. Raises ValueError or
    TypeError naming the argument for bad input, FileNotFoundError for a missing
    annotation file."""
    budgets = _check_args(domains, budgets, sharing, epochs, batch_size, width, max_train,
                          max_eval, workers, seed, log)
    log = log or (lambda _: None)
    started = time.perf_counter()
    device = _device(device)
    net, backbone_info = _backbone(backbone, width)  # before the devkit: a bad file fails fast
    data, train_sets, val_sets = _read(root, domains, max_train, max_eval, seed, log)
    if train_weights is None:
        train_weights = backbone is None  # frozen random weights would learn nothing
    val = _loaders(val_sets, 2 * batch_size, None, workers)
    rows: List[Dict] = []
    for k, budget in enumerate(budgets):
        share = sharing if budget < 1.0 else None
        name = f"budget {budget}" + (f", {share}" if share else "")
        log(f"[{k + 1}/{len(budgets)}] {name}: training {epochs} epoch(s)")
        torch.manual_seed(seed)  # every budget starts from the same heads and data order
        train_loaders = _loaders(train_sets, batch_size, seed, workers)
        row = _one_budget(net, data.num_classes, train_loaders, val, budget=budget,
                          sharing=share, epochs=epochs, train_weights=train_weights,
                          device=device, progress=progress, log=log)
        # A short run can end before the masks reach the budget: say so, or the row
        # would read as the budget's accuracy.
        row["over_budget"] = [n for n, f in zip(data.names, row["domain_flops"])
                              if f > budget + BUDGET_SLACK]
        rows.append({"name": name, **row})
        accs = " ".join(f"{100 * a:.1f}" for a in row["accuracy"])
        log(f"{name}: val accuracy % [{accs}], FLOPs vs one network "
            f"{100 * row['flops_vs_one']:.1f}%")
        if row["over_budget"]:
            log(f"note: {', '.join(row['over_budget'])} still above budget {budget} after "
                f"{epochs} epoch(s); train longer (--epochs)")
    score_rows(rows, [1 - a for a in rows[0]["accuracy"]])
    result = {
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "root": os.path.abspath(root), "domains": data.names, "num_classes": data.num_classes,
        "images": {d.name: {"train": len(t), "val": len(v)}
                   for d, t, v in zip(data.domains, train_sets, val_sets)},
        "preprocessing": {d.name: d.source for d in data.domains},
        "budgets": list(budgets), "sharing": sharing, "epochs": epochs,
        "batch_size": batch_size, "width": width, "backbone": backbone_info,
        "train_weights": train_weights, "seed": seed, "device": str(device),
        "cost_input_size": [3, TRAIN_SIZE, TRAIN_SIZE],
        "eval_input_size": [3, EVAL_SIZE, EVAL_SIZE],
        "score_reference": "this run's budget-1.0 model: Emax_d = 2 x its val error",
        "rows": rows, "seconds": time.perf_counter() - started,
    }
    text = table(result)
    log(text)
    write_report(out_dir, "decathlon", text, result)
    log(f"written to {os.path.abspath(out_dir)}: decathlon.md, decathlon.json")
    return result


def _read(root, domains, max_train, max_eval, seed, log):
    """(benchmark, train sets, val sets): the devkit with its preprocessing, each
    split capped at ``max_train`` / ``max_eval`` images, every image labelled."""
    from .data import decathlon_benchmark

    log(f"reading the Visual Decathlon devkit at {os.path.abspath(root)}")
    data = decathlon_benchmark(root, list(domains), preprocess="devkit", train_size=TRAIN_SIZE,
                               eval_size=EVAL_SIZE, resize_to=RESIZE_TO)
    train_sets = [_cap(d.train, max_train, seed + i) for i, d in enumerate(data.domains)]
    val_sets = [_cap(d.val, max_eval, seed + i) for i, d in enumerate(data.domains)]
    _check_splits(data, train_sets, val_sets)
    log(data.table())
    return data, train_sets, val_sets


def _one_budget(net, num_classes, train_loaders, val_loaders, *, budget, sharing, epochs,
                train_weights, device, progress, log) -> Dict:
    """Convert ``net`` for the domains, train its masks at ``budget``, prune, and
    measure the pruned network: val accuracy per domain, params and FLOPs (union
    and each domain's) against one single-domain network."""
    from . import convert, evaluate, prune, train

    model = convert(net, len(num_classes), num_classes, input_size=(3, TRAIN_SIZE, TRAIN_SIZE))
    history = train(model, train_loaders, None, budget=budget, epochs=epochs, sharing=sharing,
                    train_weights=train_weights, device=device, progress=progress, log=log)
    pruned = prune(model)
    return {"budget": budget, "sharing": sharing,
            **pruned_row(pruned, evaluate(pruned, val_loaders)),
            "train_loss": history[-1]["loss"]}


def table(result: Dict) -> str:
    """The report's rows as a markdown table (fastmdl experiment's), with a note on
    how to read it."""
    from .experiment import table as rows_table

    rows = [rows_table(result)]
    rows.append("")
    rows.append(f"Val accuracy ({EVAL_SIZE}x{EVAL_SIZE} centre crops). Decathlon score against "
                f"this run's budget-1.0 model (Emax = 2 x its error; it scores 250 per domain). "
                f"Params and FLOPs of the pruned network against one single-domain ResNet-26, "
                f"counted at {TRAIN_SIZE}x{TRAIN_SIZE}. (over budget): some domain's FLOPs "
                f"ended above the budget (too few epochs); the JSON names them.")
    return "\n".join(rows)


def _check_args(domains, budgets, sharing, epochs, batch_size, width, max_train, max_eval,
                workers, seed, log) -> List[float]:
    """Raise for bad arguments; return the budgets to run, 1.0 first."""
    if isinstance(domains, str) or not isinstance(domains, Sequence):
        raise TypeError(f"domains must be a sequence of domain names, got "
                        f"{type(domains).__name__}")
    if not domains or not all(isinstance(d, str) and d for d in domains):
        raise ValueError(f"domains must be non-empty names, got {list(domains)!r}")
    if len(set(domains)) != len(domains):
        raise ValueError(f"domains must not repeat a name, got {list(domains)}")
    if isinstance(budgets, (str, bytes)) or not isinstance(budgets, Sequence) or not budgets:
        raise TypeError("budgets must be a non-empty sequence of fractions in (0, 1]")
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1:
            raise ValueError(f"budgets must be fractions in (0, 1], got {b!r}")
    if sharing is not None and sharing not in SHARING:
        raise ValueError(f"sharing must be one of {SHARING} or None, got {sharing!r}")
    for arg, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be a positive int, got {v!r}")
    for arg, v in (("max_train", max_train), ("max_eval", max_eval)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{arg} must be a positive int or None, got {v!r}")
    for arg, v in (("workers", workers), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{arg} must be an int >= 0, got {v!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) \
            or not (math.isfinite(width) and width > 0):
        raise ValueError(f"width must be a finite number > 0, got {width!r}")
    ordered = sorted({float(b) for b in budgets}, reverse=True)
    if ordered[0] != 1.0:
        if log:
            log("budget 1.0 added: it is the decathlon score's reference")
        ordered.insert(0, 1.0)
    return ordered


def _device(device: Optional[str]) -> torch.device:
    """``device`` as a torch.device (default: cuda if available, else cpu)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        out = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must name a torch device such as cpu or cuda:0, got "
                         f"{device!r}") from e
    if out.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here")
    return out


def _cap(dataset, limit: Optional[int], seed: int):
    """``dataset``, or a seeded random ``limit`` of its items (the devkit lists
    images class by class, so the first ``limit`` would miss classes)."""
    if limit is None or len(dataset) <= limit:
        return dataset
    g = torch.Generator().manual_seed(seed)
    return Subset(dataset, sorted(torch.randperm(len(dataset), generator=g)[:limit].tolist()))


def _check_splits(data, train_sets, val_sets) -> None:
    """Every domain needs train and val images, all of them labelled."""
    for d, t, v in zip(data.domains, train_sets, val_sets):
        for split, images in (("train", t), ("val", v)):
            if len(images) == 0:
                raise ValueError(f"domain {d.name} has no {split} images")
            files = images.dataset if isinstance(images, Subset) else images
            indices = images.indices if isinstance(images, Subset) else range(len(files))
            if any(files.labels[i] < 0 for i in indices):
                raise ValueError(f"domain {d.name}'s {split} split has images without labels "
                                 f"(no annotations in its annotation file)")


def _loaders(datasets, batch_size: int, seed: Optional[int], workers: int) -> List[DataLoader]:
    """One DataLoader per domain: shuffled with a generator seeded per domain when
    ``seed`` is given (which also seeds the workers' random crops), in order
    otherwise."""
    out = []
    for i, ds in enumerate(datasets):
        g = None if seed is None else torch.Generator().manual_seed(seed + i)
        out.append(DataLoader(ds, batch_size=batch_size, shuffle=seed is not None, generator=g,
                              num_workers=workers))
    return out


def _backbone(path, width: float):
    """(ResNet-26 at ``width``, description): random initialisation, or the weights
    of the state_dict at ``path`` (read with weights_only=True)."""
    from .models import resnet26

    if path is None:
        return resnet26(num_classes=10, width=width), {"weights": "random initialisation"}
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone file {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and containers
        raise ValueError(f"backbone {path} cannot be read as a state_dict with "
                         f"weights_only=True: {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if not isinstance(fc, torch.Tensor) or fc.dim() != 2:
        raise ValueError(f"backbone {path} is not a state_dict of fastmdl.models.resnet26 "
                         f"(no 2-D 'fc.weight')")
    net = resnet26(num_classes=fc.shape[0], width=width)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"backbone {path} does not fit fastmdl.models.resnet26(width={width}): "
                         f"{e}") from e
    return net, {"weights": path, "num_classes": int(fc.shape[0])}
