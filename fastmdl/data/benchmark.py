"""The built-in multi-domain benchmark: four real-image classification tasks,
each with its own label space, at one common size, with seeded splits."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from . import sources

SPLITS = ("train", "val", "test")
DOMAINS = ("fashion", "digits", "faces", "textures")


@dataclass
class Domain:
    """One task: ``train``/``val``/``test`` are TensorDatasets of (1, size, size)
    images standardised with the training split's ``mean`` and ``std``, and
    int64 labels in [0, num_classes)."""

    name: str
    classes: Tuple[str, ...]
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    source: str
    mean: float = 0.0
    std: float = 1.0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> TensorDataset:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)


@dataclass
class MultiDomainData:
    """Several domains at one image size."""

    domains: List[Domain]
    size: int

    @property
    def names(self) -> List[str]:
        return [d.name for d in self.domains]

    @property
    def num_classes(self) -> List[int]:
        return [d.num_classes for d in self.domains]

    def loaders(self, split: str, batch_size: int = 64, *, shuffle: Optional[bool] = None,
                seed: int = 0, drop_last: bool = False) -> List[DataLoader]:
        """One DataLoader per domain over ``split`` (shuffled, with a seeded
        generator, for "train" unless ``shuffle`` says otherwise)."""
        shuffle = split == "train" if shuffle is None else shuffle
        out = []
        for i, d in enumerate(self.domains):
            g = torch.Generator().manual_seed(seed + i)
            out.append(DataLoader(d.split(split), batch_size=batch_size, shuffle=shuffle,
                                  generator=g if shuffle else None, drop_last=drop_last))
        return out

    def table(self) -> str:
        """A markdown table of the domains: classes, split sizes and source."""
        rows = ["| domain | classes | train | val | test | source |",
                "|---|---:|---:|---:|---:|---|"]
        for d in self.domains:
            rows.append(f"| {d.name} | {d.num_classes} | {len(d.train)} | {len(d.val)} | "
                        f"{len(d.test)} | {d.source} |")
        return "\n".join(rows)


def builtin_benchmark(size: int = 32, *, domains: Sequence[str] = DOMAINS,
                      fashion_root: Optional[str] = None, seed: int = 0,
                      max_train: int = 3000, max_eval: int = 600,
                      missing: str = "error") -> MultiDomainData:
    """The built-in benchmark of real images, offline.

    Domains (see ``fastmdl/data/sources.py``): ``fashion`` (Fashion-MNIST),
    ``digits`` (scikit-learn's 8x8 digits), ``faces`` (scikit-image's face /
    non-face patches), ``textures`` (patches of scikit-image's brick, grass and
    gravel images; train, val and test patches come from disjoint bands of each
    image). Images are greyscale, resized to ``size`` x ``size`` (bilinear,
    antialiased) and standardised per domain. Splits are drawn with ``seed``; a
    split holds at most ``max_train`` (train) or ``max_eval`` (val, test) images.
    A source that is not installed raises :class:`sources.SourceMissing` with the
    install command, or with ``missing="skip"`` is left out with a warning.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        raise ValueError(f"domains must be a non-empty subset of {DOMAINS}, got {list(domains)}")
    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
    for name, v in (("max_train", max_train), ("max_eval", max_eval)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    builders: Dict[str, Callable[[], Domain]] = {
        "fashion": lambda: _fashion(size, fashion_root, seed, max_train, max_eval),
        "digits": lambda: _shuffled("digits", *sources.digits(), tuple(str(i) for i in range(10)),
                                    size, seed, max_train, max_eval,
                                    "scikit-learn load_digits (8x8)"),
        "faces": lambda: _shuffled("faces", *sources.faces(), ("non-face", "face"), size, seed,
                                   max_train, max_eval, "scikit-image lfw_subset (25x25)"),
        "textures": lambda: _textures(size, seed, max_train, max_eval),
    }
    out = []
    for name in domains:
        try:
            out.append(builders[name]())
        except sources.SourceMissing as e:
            if missing == "error":
                raise
            warnings.warn(f"fastmdl.data: leaving out domain {name!r}: {e}", RuntimeWarning,
                          stacklevel=2)
    if not out:
        raise sources.SourceMissing("no domain of the built-in benchmark is installed")
    return MultiDomainData(out, size)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W) images in [0, 1] -> (N, 1, size, size), bilinear with antialiasing."""
    x = images[:, None].float()
    if tuple(x.shape[2:]) == (size, size):
        return x.contiguous()
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).clamp_(0, 1)


def _domain(name, classes, splits, size, source) -> Domain:
    xs = {k: resize(x, size) for k, (x, _) in splits.items()}
    mean, std = float(xs["train"].mean()), float(xs["train"].std().clamp(min=1e-6))
    sets = {k: TensorDataset((xs[k] - mean) / std, y) for k, (_, y) in splits.items()}
    return Domain(name, tuple(classes), sets["train"], sets["val"], sets["test"], source,
                  mean, std)


def _fashion(size, root, seed, max_train, max_eval) -> Domain:
    data = sources.fashion_mnist(root)
    g = torch.Generator().manual_seed(seed)
    x, y = data["train"]
    order = torch.randperm(len(y), generator=g)
    val, train = order[:max_eval], order[max_eval:max_eval + max_train]
    tx, ty = data["test"]
    test = torch.randperm(len(ty), generator=g)[:max_eval]
    return _domain("fashion", sources.FASHION_CLASSES,
                   {"train": (x[train], y[train]), "val": (x[val], y[val]),
                    "test": (tx[test], ty[test])}, size, "Fashion-MNIST (28x28)")


def _shuffled(name, x, y, classes, size, seed, max_train, max_eval, source) -> Domain:
    """70 / 15 / 15 split of a source without official splits, stratified by class."""
    g = torch.Generator().manual_seed(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in range(len(classes)):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_eval = max(1, round(0.15 * len(idx)))
        parts["test"].append(idx[:n_eval])
        parts["val"].append(idx[n_eval:2 * n_eval])
        parts["train"].append(idx[2 * n_eval:])
    limits = {"train": max_train, "val": max_eval, "test": max_eval}
    splits = {}
    for k, chunks in parts.items():
        idx = torch.cat(chunks)
        idx = idx[torch.randperm(len(idx), generator=g)][:limits[k]]
        splits[k] = (x[idx], y[idx])
    return _domain(name, classes, splits, size, source)


def _textures(size, seed, max_train, max_eval, patch: int = 48) -> Domain:
    """Random ``patch`` x ``patch`` crops; train from the top 60% of each image, val
    from the next 20%, test from the bottom 20%, so no pixel is in two splits."""
    images = sources.texture_images()
    g = torch.Generator().manual_seed(seed)
    bands = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}
    counts = {"train": max_train, "val": max_eval, "test": max_eval}
    splits = {}
    for split, (lo, hi) in bands.items():
        per_class = max(1, counts[split] // len(images))
        xs, ys = [], []
        for label, img in enumerate(images.values()):
            h, w = img.shape
            top, bottom = int(lo * h), int(hi * h) - patch
            r = torch.randint(top, bottom + 1, (per_class,), generator=g)
            c = torch.randint(0, w - patch + 1, (per_class,), generator=g)
            xs.append(torch.stack([img[i:i + patch, j:j + patch]
                                   for i, j in zip(r.tolist(), c.tolist())]))
            ys.append(torch.full((per_class,), label, dtype=torch.int64))
        x, y = torch.cat(xs), torch.cat(ys)
        order = torch.randperm(len(y), generator=g)
        splits[split] = (x[order], y[order])
    return _domain("textures", sources.TEXTURES, splits, size,
                   f"scikit-image brick/grass/gravel, {patch}x{patch} patches")
