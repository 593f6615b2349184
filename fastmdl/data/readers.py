"""Readers for the real multi-domain benchmarks a user may have on disk.

- Visual Decathlon (the devkit): ``<root>/annotations/<domain>_<split>.json``,
  COCO-style files listing ``images`` (``id``, ``file_name`` relative to
  ``<root>``), ``annotations`` (``image_id``, ``category_id``) and ``categories``
  (``id``, ``name``); the images under ``<root>/data/<domain>/<split>/``; and,
  optionally, the devkit's per-domain statistics ``<root>/decathlon_mean_std.pickle``.
- ImageFolder trees (ImageNet-to-Sketch and the like):
  ``<root>/<domain>/<split>/<class>/<image>``.

Images are read lazily with Pillow and converted to RGB (or greyscale). By
default they are resized to ``size`` x ``size`` and normalised with ``mean`` /
``std`` (ImageNet's). The Decathlon reader's ``preprocess="devkit"`` does what
the Decathlon papers' code does instead (:class:`DevkitTrain`, :class:`DevkitEval`):
shorter side to 72, a random 64 x 64 crop and a horizontal flip for training, the
72 x 72 centre for evaluation, and each domain's own mean and std.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import pickle
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from .benchmark import Domain, MultiDomainData

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

#: The devkit's per-domain statistics, in the devkit's root.
MEAN_STD_FILE = "decathlon_mean_std.pickle"
#: Domains whose images mean something else mirrored (signs, characters, digits):
#: the devkit's training transform does not flip them.
NO_FLIP = frozenset({"gtsrb", "omniglot", "svhn"})
PREPROCESS = ("resize", "devkit")
# The devkit's statistics file is a few hundred bytes; anything near this is not it.
_MAX_MEAN_STD_BYTES = 1 << 20

MeanStd = Dict[str, List[float]]


# Image transforms: a PIL image in, a PIL image out. Randomness comes from torch's
# global RNG (drawn in the order torchvision's RandomCrop and RandomHorizontalFlip
# draw it), so torch.manual_seed and a DataLoader's per-worker seeding decide it.

def resize_shorter(im, size: int):
    """``im`` scaled (bilinear) so that its shorter side is ``size``, aspect ratio
    kept: (w, h) -> (size, floor(size h / w)) when w <= h, else
    (floor(size w / h), size); unchanged if the shorter side already is ``size``
    (torchvision's ``Resize(size)``)."""
    from PIL import Image

    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return im
    new_long = int(size * long / short)
    new = (size, new_long) if w <= h else (new_long, size)
    return im.resize(new, Image.BILINEAR)


def center_crop(im, size: int):
    """The ``size`` x ``size`` centre of ``im``: top = round((h - size) / 2),
    left = round((w - size) / 2)."""
    w, h = _fits(im, size)
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
    return im.crop((left, top, left + size, top + size))


def random_crop(im, size: int):
    """A ``size`` x ``size`` crop of ``im`` at a uniformly drawn position (top, then
    left, from torch's global RNG)."""
    w, h = _fits(im, size)
    top = int(torch.randint(0, h - size + 1, size=(1,)).item())
    left = int(torch.randint(0, w - size + 1, size=(1,)).item())
    return im.crop((left, top, left + size, top + size))


def random_flip(im, p: float = 0.5):
    """``im`` mirrored left-right with probability ``p`` (torch's global RNG)."""
    from PIL import Image

    return im.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1).item() < p else im


def _fits(im, size: int) -> Tuple[int, int]:
    w, h = im.size
    if w < size or h < size:
        raise ValueError(f"cannot crop {size}x{size} from a {w}x{h} image")
    return w, h


class SquareResize:
    """The plain reader's transform: (w, h) -> (size, size), bilinear."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, im):
        from PIL import Image

        return im.resize((self.size, self.size), Image.BILINEAR)


class DevkitTrain:
    """The Decathlon devkit's training transform: shorter side to ``resize_to``, a
    random ``crop`` x ``crop`` crop, then (with ``flip``) a left-right flip with
    probability 1/2."""

    def __init__(self, resize_to: int = 72, crop: int = 64, flip: bool = True):
        self.resize_to, self.crop, self.flip = resize_to, crop, flip

    def __call__(self, im):
        im = random_crop(resize_shorter(im, self.resize_to), self.crop)
        return random_flip(im) if self.flip else im


class DevkitEval:
    """The Decathlon devkit's evaluation transform: shorter side to ``resize_to``,
    then the ``crop`` x ``crop`` centre (deterministic)."""

    def __init__(self, resize_to: int = 72, crop: int = 72):
        self.resize_to, self.crop = resize_to, crop

    def __call__(self, im):
        return center_crop(resize_shorter(im, self.resize_to), self.crop)


class ImageFiles(Dataset):
    """(image, label) pairs read from files on demand: a (C, H, W) float32 tensor,
    normalised as (x - mean) / std with x in [0, 1], and an int64 label (-1 where
    the split has none). ``transform`` maps the PIL image to the one returned
    (default: :class:`SquareResize` to ``size`` x ``size``)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], size: int, *,
                 grey: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD, transform=None):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths, self.labels, self.size, self.grey = list(paths), list(labels), size, grey
        self.transform = SquareResize(size) if transform is None else transform
        channels = 1 if grey else 3
        self.mean = torch.tensor(mean[:channels] if len(mean) >= channels else mean).view(-1, 1, 1)
        self.std = torch.tensor(std[:channels] if len(std) >= channels else std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as im:
                im = self.transform(im.convert("L" if self.grey else "RGB"))
                w, h = im.size
                x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except OSError as e:
            raise ValueError(f"cannot read image {self.paths[i]}: {e}") from e
        x = x.view(h, w, -1).permute(2, 0, 1).float() / 255
        return (x - self.mean) / self.std, torch.tensor(self.labels[i], dtype=torch.int64)


class _NoGlobals(pickle.Unpickler):
    """An unpickler that resolves no global at all: no class, no function, so
    nothing in the file can run. Plain containers, strings and numbers need none."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it refers to the global {module}.{name}, and only plain "
                                     "dicts, lists, strings and numbers are read")


def load_mean_std(path: Union[str, os.PathLike]) -> MeanStd:
    """The devkit's ``decathlon_mean_std.pickle``: a dict with keys ``<domain>mean``
    and ``<domain>std``, each a list of per-channel values on the [0, 1] scale.

    It is read with an unpickler that refuses every global (so the file cannot
    run code) and with ``encoding="latin1"``, as the Decathlon code reads it (so
    a Python 2 pickle's byte strings come back as str). Raises ValueError naming the file for anything but a dict of
    strings to lists of finite numbers (a file holding numpy arrays included:
    write ``{k: list(map(float, v)) for k, v in d.items()}`` back once)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mean_std file {path} not found")
    if os.path.getsize(path) > _MAX_MEAN_STD_BYTES:
        raise ValueError(f"{path} is {os.path.getsize(path)} bytes: too large for the devkit's "
                         f"per-domain mean and std")
    with open(path, "rb") as f:
        try:
            stats = _NoGlobals(f, encoding="latin1").load()
        except Exception as e:  # nothing ran: any failure means "not the file we read"
            raise ValueError(f"{path} is not a plain pickle of per-domain mean and std: "
                             f"{e}") from e
    return _check_mean_std(stats, path)


def _check_mean_std(stats, what: str) -> MeanStd:
    """``stats`` as {str: [float, ...]}, or ValueError naming ``what``."""
    if not isinstance(stats, dict):
        raise ValueError(f"{what} must hold a dict of '<domain>mean' / '<domain>std' lists, "
                         f"got {type(stats).__name__}")
    out = {}
    for k, v in stats.items():
        ok = (isinstance(k, str) and isinstance(v, (list, tuple)) and len(v) > 0 and all(
            isinstance(c, numbers.Real) and not isinstance(c, bool) and math.isfinite(c)
            for c in v))
        if not ok:
            raise ValueError(f"{what}: entry {k!r} must map a string to a list of finite "
                             f"numbers, got {v!r}"[:300])
        out[k] = [float(c) for c in v]
    return out


def resolve_mean_std(root: str, mean_std=None, *, preprocess: str = "devkit"
                     ) -> Tuple[Optional[MeanStd], str]:
    """(per-domain statistics or None for ImageNet's, where they came from).

    ``mean_std`` is a path to a pickle like the devkit's, a dict like the one it
    holds, or None: with ``preprocess="devkit"`` the devkit's
    ``<root>/decathlon_mean_std.pickle``, or ImageNet's statistics with a
    warning if there is none; with ``preprocess="resize"`` ImageNet's (the
    reader's behaviour before the devkit preprocessing existed)."""
    if mean_std is None:
        if preprocess == "resize":
            return None, "ImageNet mean/std"
        path = os.path.join(root, MEAN_STD_FILE)
        if not os.path.isfile(path):
            warnings.warn(f"fastmdl.data: {path} not found: normalising every Decathlon domain "
                          f"with ImageNet's mean and std instead of the devkit's own",
                          RuntimeWarning, stacklevel=2)
            return None, f"ImageNet mean/std ({MEAN_STD_FILE} not found)"
        return load_mean_std(path), path
    if isinstance(mean_std, dict):
        return _check_mean_std(mean_std, "mean_std"), "mean_std dict"
    if isinstance(mean_std, (str, os.PathLike)):
        return load_mean_std(mean_std), os.fspath(mean_std)
    raise TypeError(f"mean_std must be a path, a dict or None, got {type(mean_std).__name__}")


def domain_mean_std(stats: Optional[MeanStd], name: str, where: str = "mean_std"
                    ) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Domain ``name``'s (mean, std) from ``stats`` (keys ``<name>mean``,
    ``<name>std``); ImageNet's where ``stats`` is None, or, with a warning, where
    it has no entry for ``name``."""
    if stats is None:
        return IMAGENET_MEAN, IMAGENET_STD
    keys = (name + "mean", name + "std")
    if not all(k in stats for k in keys):
        warnings.warn(f"fastmdl.data: {where} has no {keys[0]!r} / {keys[1]!r}: normalising "
                      f"{name} with ImageNet's mean and std", RuntimeWarning, stacklevel=3)
        return IMAGENET_MEAN, IMAGENET_STD
    mean, std = stats[keys[0]], stats[keys[1]]
    if len(mean) != len(std) or len(mean) not in (1, 3) or min(std) <= 0:
        raise ValueError(f"{where}: {name} needs 1 or 3 means and as many stds > 0, got "
                         f"mean {mean} and std {std}")
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    return tuple(mean), tuple(std)


def decathlon_domain(root: str, name: str, *, size: int = 64, grey: bool = False,
                     splits: Dict[str, str] = None, preprocess: str = "resize",
                     train_size: int = 64, eval_size: int = 72, resize_to: int = 72,
                     mean_std=None) -> Domain:
    """One Visual Decathlon domain from the devkit at ``root``. ``splits`` maps our
    split names to the devkit's (default train->train, val->val, test->test; a
    devkit split without annotations, such as the public test set, gets labels -1).
    Category ids are mapped to 0..K-1 in ascending id order.

    ``preprocess`` says how images become tensors:

    - ``"resize"`` (the default, what this reader always did, so existing callers
      get the same tensors): every split resized to ``size`` x ``size``,
      normalised with ImageNet's mean and std (or ``mean_std``'s, if given);
    - ``"devkit"`` (the Decathlon papers' preprocessing, what ``fastmdl
      decathlon`` uses): shorter side to ``resize_to``, then for our "train"
      split a random ``train_size`` crop and a left-right flip with probability
      1/2 (none for gtsrb, omniglot and svhn: :data:`NO_FLIP`), for the other
      splits the ``eval_size`` centre; normalised with the domain's own mean and
      std from ``mean_std`` (see :func:`resolve_mean_std`; by default the
      devkit's ``<root>/decathlon_mean_std.pickle``, ImageNet's with a warning
      if it is absent). ``size`` is not used."""
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
    if preprocess == "devkit":
        _check_devkit_sizes(train_size, eval_size, resize_to)
    splits = splits or {"train": "train", "val": "val", "test": "test"}
    categories: Optional[List[Tuple[int, str]]] = None
    found = {}
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
        found[ours] = ([os.path.join(root, images[i]) for i in ids],
                       [index[labels[i]] if i in labels else -1 for i in ids])
    for split in ("train", "val", "test"):
        found.setdefault(split, ([], []))

    # The statistics only once the domain is known to exist: no warning about a
    # domain that is not there.
    if isinstance(mean_std, _Resolved):
        stats, where = mean_std.get()
    else:
        stats, where = resolve_mean_std(root, mean_std, preprocess=preprocess)
    mean, std = domain_mean_std(stats, name, where)
    if preprocess == "devkit":
        flip = name not in NO_FLIP
        train_tf = DevkitTrain(resize_to, train_size, flip=flip)
        eval_tf = DevkitEval(resize_to, eval_size)
        how = (f"shorter side {resize_to}; train: random {train_size}x{train_size} crop"
               f"{', flip' if flip else ''}; eval: centre {eval_size}x{eval_size}; "
               f"mean/std: {where}")
    else:
        train_tf = eval_tf = SquareResize(size)
        how = f"resized to {size}x{size}; mean/std: {where}"
    sets = {split: ImageFiles(paths, labels, size, grey=grey, mean=mean, std=std,
                              transform=train_tf if split == "train" else eval_tf)
            for split, (paths, labels) in found.items()}
    classes = tuple(n for _, n in categories or [])
    return Domain(name, classes, sets["train"], sets["val"], sets["test"],
                  f"Visual Decathlon devkit: {name} ({how})")


class _Resolved:
    """The statistics :func:`decathlon_benchmark` reads once for all its domains,
    when the first domain is found (so a wrong root gets its error, no warning)."""

    def __init__(self, root: str, mean_std, preprocess: str):
        self.args, self.value = (root, mean_std, preprocess), None

    def get(self) -> Tuple[Optional[MeanStd], str]:
        if self.value is None:
            root, mean_std, preprocess = self.args
            self.value = resolve_mean_std(root, mean_std, preprocess=preprocess)
        return self.value


def _check_devkit_sizes(train_size, eval_size, resize_to) -> None:
    for arg, v in (("train_size", train_size), ("eval_size", eval_size),
                   ("resize_to", resize_to)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{arg} must be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"{arg} must be >= 1, got {v}")
    for arg, v in (("train_size", train_size), ("eval_size", eval_size)):
        if v > resize_to:
            raise ValueError(f"{arg} ({v}) must be <= resize_to ({resize_to}): crops are taken "
                             f"from images whose shorter side is resize_to")


def decathlon_benchmark(root: str, names: Sequence[str], *, size: int = 64,
                        grey: bool = False, preprocess: str = "resize", train_size: int = 64,
                        eval_size: int = 72, resize_to: int = 72,
                        mean_std=None) -> MultiDomainData:
    """Several Visual Decathlon domains (e.g. ``["aircraft", "cifar100", "dtd"]``),
    each read by :func:`decathlon_domain` with these arguments; the statistics
    file is read (or found missing, with one warning) once for all of them. The
    benchmark's ``size`` is that of the training images: ``train_size`` with
    ``preprocess="devkit"`` (the other splits are then ``eval_size`` square),
    ``size`` otherwise."""
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
    resolved = _Resolved(root, mean_std, preprocess)
    domains = [decathlon_domain(root, n, size=size, grey=grey, preprocess=preprocess,
                                train_size=train_size, eval_size=eval_size,
                                resize_to=resize_to, mean_std=resolved) for n in names]
    return MultiDomainData(domains, train_size if preprocess == "devkit" else size)


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
