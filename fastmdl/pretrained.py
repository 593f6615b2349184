"""The backbone every built-in experiment starts from: a ResNet-26 pretrained on
Fashion-MNIST (the stand-in for ImageNet), trained once and cached on disk."""

from __future__ import annotations

import io
import json
import os
import time
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ._io import write_atomic_bytes
from .models import ResNet, resnet26


def cache_dir() -> str:
    """``$FASTMDL_CACHE``, else ``~/.cache/fastmdl``."""
    return os.environ.get("FASTMDL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "fastmdl")


def pretrained_backbone(*, size: int = 32, width: float = 0.25, epochs: int = 2,
                        max_train: int = 20000, batch_size: int = 128, lr: float = 0.05,
                        seed: int = 0, directory: Optional[str] = None,
                        fashion_root: Optional[str] = None,
                        progress: bool = True) -> Tuple[ResNet, Dict]:
    """A greyscale ``resnet26(width=width)`` trained on ``max_train`` Fashion-MNIST
    images at ``size`` x ``size`` for ``epochs`` (SGD with momentum, cosine
    learning rate), standardised as :func:`fastmdl.data.builtin_benchmark` does.

    The weights are cached under ``directory`` (default :func:`cache_dir`), keyed
    by every setting above, written atomically and read back without unpickling
    code; a later call with the same settings reuses them. Returns the model (in
    eval mode) and a dict with the settings, validation accuracy, training time
    and the cache path.
    """
    settings = {"size": size, "width": width, "epochs": epochs, "max_train": max_train,
                "batch_size": batch_size, "lr": lr, "seed": seed}
    key = "resnet26-fashion-" + "-".join(f"{k}{v}" for k, v in settings.items()) + ".pt"
    path = os.path.join(directory or cache_dir(), key)
    # The starting weights are a function of `seed` alone (the cache key), not of the
    # caller's random state: otherwise whoever trains first decides what the cache
    # holds for everyone with the same key. The caller's generator is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = resnet26(num_classes=10, width=width, in_channels=1)
    if os.path.exists(path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            info = json.loads(state["info"])
            info["cache"], info["reused"] = path, True
            return model.eval(), info
        except Exception as e:  # a damaged cache is rebuilt, and said so
            import warnings

            warnings.warn(f"fastmdl: cached backbone {path} is unreadable ({e}); retraining",
                          RuntimeWarning, stacklevel=2)

    from .data import builtin_benchmark

    data = builtin_benchmark(size, domains=["fashion"], fashion_root=fashion_root, seed=seed,
                             max_train=max_train, max_eval=1000).domains[0]
    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(data.train, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed),
                                         drop_last=True)
    steps = epochs * len(loader)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.15)
    bar = _bar(steps, progress, "pretraining ResNet-26 on Fashion-MNIST")
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    with torch.no_grad():
        x, y = data.val.tensors
        acc = float((model(x).argmax(1) == y).float().mean())
    info = dict(settings, val_accuracy=acc, train_seconds=time.perf_counter() - start,
                source="Fashion-MNIST")
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "info": json.dumps(info)}, buf)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic_bytes(path, buf.getvalue())
    info["cache"], info["reused"] = path, False
    return model, info


def _bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False)
