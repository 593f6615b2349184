"""Readers for the real multi-domain benchmarks a user may have on disk.

- Visual Decathlon (the devkit): ``<root>/annotations/<domain>_<split>.json``,
  COCO-style files listing ``images`` (``id``, ``file_name`` relative to
  ``<root>``), ``annotations`` (``image_id``, ``category_id``) and ``categories``
  (``id``, ``name``); the images under ``<root>/data/<domain>/<split>/``.
- ImageFolder trees (ImageNet-to-Sketch and the like):
  ``<root>/<domain>/<split>/<class>/<image>``.

Images are read lazily with Pillow, converted to RGB (or greyscale), resized to
``size`` x ``size`` and normalised with ``mean`` / ``std`` (ImageNet's by default).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from .benchmark import Domain, MultiDomainData

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageFiles(Dataset):
    """(image, label) pairs read from files on demand: a (C, size, size) float32
    tensor, normalised, and an int64 label (-1 where the split has none)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], size: int, *,
                 grey: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths, self.labels, self.size, self.grey = list(paths), list(labels), size, grey
        channels = 1 if grey else 3
        self.mean = torch.tensor(mean[:channels] if len(mean) >= channels else mean).view(-1, 1, 1)
        self.std = torch.tensor(std[:channels] if len(std) >= channels else std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as im:
                im = im.convert("L" if self.grey else "RGB").resize(
                    (self.size, self.size), Image.BILINEAR)
                x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except OSError as e:
            raise ValueError(f"cannot read image {self.paths[i]}: {e}") from e
        x = x.view(self.size, self.size, -1).permute(2, 0, 1).float() / 255
        return (x - self.mean) / self.std, torch.tensor(self.labels[i], dtype=torch.int64)


def decathlon_domain(root: str, name: str, *, size: int = 64, grey: bool = False,
                     splits: Dict[str, str] = None) -> Domain:
    """One Visual Decathlon domain from the devkit at ``root``. ``splits`` maps our
    split names to the devkit's (default train->train, val->val, test->test; a
    devkit split without annotations, such as the public test set, gets labels -1).
    Category ids are mapped to 0..K-1 in ascending id order."""
    splits = splits or {"train": "train", "val": "val", "test": "test"}
    categories: Optional[List[Tuple[int, str]]] = None
    sets = {}
    for ours, theirs in splits.items():
        path = os.path.join(root, "annotations", f"{name}_{theirs}.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"Visual Decathlon annotation file {path} not found "
                                    f"(expected <root>/annotations/<domain>_<split>.json)")
        try:
            with open(path) as f:
                ann = json.load(f)
            cats = sorted((int(c["id"]), str(c["name"])) for c in ann["categories"])
            images = {int(im["id"]): im["file_name"] for im in ann["images"]}
            labels = {int(a["image_id"]): int(a["category_id"]) for a in ann.get("annotations", [])}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a COCO-style Decathlon annotation file: {e!r}") from e
        if categories is None:
            categories = cats
        elif cats != categories:
            raise ValueError(f"{path} lists other categories than the {name} split before it")
        index = {cid: k for k, (cid, _) in enumerate(categories)}
        ids = sorted(images)
        unknown = {labels[i] for i in ids if i in labels} - set(index)
        if unknown:
            raise ValueError(f"{path} uses category ids {sorted(unknown)} not in its categories")
        sets[ours] = ImageFiles([os.path.join(root, images[i]) for i in ids],
                                [index[labels[i]] if i in labels else -1 for i in ids],
                                size, grey=grey)
    for split in ("train", "val", "test"):
        sets.setdefault(split, ImageFiles([], [], size, grey=grey))
    classes = tuple(n for _, n in categories or [])
    return Domain(name, classes, sets["train"], sets["val"], sets["test"],
                  f"Visual Decathlon devkit: {name}")


def decathlon_benchmark(root: str, names: Sequence[str], *, size: int = 64,
                        grey: bool = False) -> MultiDomainData:
    """Several Visual Decathlon domains (e.g. ``["aircraft", "cifar100", "dtd"]``)."""
    return MultiDomainData([decathlon_domain(root, n, size=size, grey=grey) for n in names], size)


def image_folder_domain(root: str, name: str, *, size: int = 224, grey: bool = False,
                        splits: Dict[str, str] = None) -> Domain:
    """One domain of an ImageFolder tree: ``<root>/<name>/<split>/<class>/<image>``.
    Classes are the sorted sub-directories of the first split; a split directory
    that does not exist is empty; a class missing from a later split is fine,
    an unknown one is an error."""
    splits = splits or {"train": "train", "val": "val", "test": "test"}
    base = os.path.join(root, name)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"domain directory {base} not found "
                                f"(expected <root>/<domain>/<split>/<class>/<image>)")
    classes: Optional[List[str]] = None
    sets = {}
    for ours, theirs in splits.items():
        d = os.path.join(base, theirs)
        if not os.path.isdir(d):
            sets[ours] = ImageFiles([], [], size, grey=grey)
            continue
        found = sorted(c for c in os.listdir(d) if os.path.isdir(os.path.join(d, c)))
        if classes is None:
            classes = found
        elif set(found) - set(classes):
            raise ValueError(f"{d} has classes {sorted(set(found) - set(classes))} that the "
                             f"first split of {name} does not")
        paths, labels = [], []
        for k, c in enumerate(classes):
            cdir = os.path.join(d, c)
            if not os.path.isdir(cdir):
                continue
            for f in sorted(os.listdir(cdir)):
                if f.lower().endswith(IMAGE_SUFFIXES):
                    paths.append(os.path.join(cdir, f))
                    labels.append(k)
        sets[ours] = ImageFiles(paths, labels, size, grey=grey)
    if classes is None:
        raise FileNotFoundError(f"{base} has none of the split directories {list(splits.values())}")
    return Domain(name, tuple(classes), sets["train"], sets["val"], sets["test"],
                  f"image folder {base}")


def image_folder_benchmark(root: str, names: Sequence[str], *, size: int = 224,
                           grey: bool = False) -> MultiDomainData:
    """Several ImageFolder domains under ``root`` (e.g. ImageNet-to-Sketch's
    ``["imagenet", "sketch", "cubs", "flowers", "stanford_cars", "wikiart"]``)."""
    return MultiDomainData([image_folder_domain(root, n, size=size, grey=grey) for n in names],
                           size)
