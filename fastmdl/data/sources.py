"""The real images behind the built-in benchmark, each read from a source that a
fresh machine can install without the network at run time.

| domain     | source                                                   | classes |
|------------|----------------------------------------------------------|---------|
| `fashion`  | Fashion-MNIST, Debian package `dataset-fashion-mnist`     | 10      |
| `digits`   | the 8x8 handwritten digits shipped inside scikit-learn    | 10      |
| `faces`    | face / non-face patches (`lfw_subset`) inside scikit-image | 2      |
| `textures` | patches of the brick, grass and gravel images inside scikit-image | 3 |

Each function returns uint8 or float images in [0, 1] as a (N, H, W) float32
tensor and int64 labels; a missing source raises :class:`SourceMissing`, whose
message says how to install it.
"""

from __future__ import annotations

import gzip
import os
import struct
from typing import Dict, Optional, Tuple

import numpy as np
import torch

FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle boot")
TEXTURES = ("brick", "grass", "gravel")

Arrays = Tuple[torch.Tensor, torch.Tensor]


class SourceMissing(RuntimeError):
    """A data source is not installed; the message says how to install it."""


def fashion_mnist(root: Optional[str] = None) -> Dict[str, Arrays]:
    """Fashion-MNIST's official splits: {"train": (60000 images, labels), "test": (10000, ...)},
    28x28 in [0, 1]. Read from ``root``, else ``$FASHION_MNIST_DIR``, else the
    Debian package's directory; plain or gzipped IDX files."""
    candidates = [root] if root else [os.environ.get("FASHION_MNIST_DIR"), *FASHION_DIRS]
    for directory in [c for c in candidates if c]:
        try:
            return {split: (_idx(directory, f"{prefix}-images-idx3-ubyte").float() / 255,
                            _idx(directory, f"{prefix}-labels-idx1-ubyte").long())
                    for split, prefix in (("train", "train"), ("test", "t10k"))}
        except FileNotFoundError:
            continue
    where = root or " or ".join(c for c in candidates if c)
    raise SourceMissing(
        f"Fashion-MNIST was not found in {where}. Install it with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four IDX "
        "files (train-images-idx3-ubyte[.gz], ...) in a directory and pass it as root= or "
        "set FASHION_MNIST_DIR.")


def digits() -> Arrays:
    """scikit-learn's 1797 handwritten digits, 8x8 in [0, 1] (16 grey levels)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SourceMissing("the digits domain needs scikit-learn: "
                            "pip install scikit-learn (or pip install 'fastmdl[data]')") from e
    d = load_digits()
    return torch.from_numpy(d.images.astype(np.float32) / 16.0), torch.from_numpy(d.target).long()


def faces() -> Arrays:
    """scikit-image's ``lfw_subset``: 100 faces (label 1) and 100 non-faces (label 0), 25x25."""
    data = _skimage_data()
    images = torch.from_numpy(data.lfw_subset().astype(np.float32))
    labels = torch.cat([torch.ones(100), torch.zeros(100)]).long()
    return images, labels


def texture_images() -> Dict[str, torch.Tensor]:
    """The brick, grass and gravel texture images shipped in scikit-image, 512x512 in [0, 1]."""
    data = _skimage_data()
    return {name: torch.from_numpy(getattr(data, name)().astype(np.float32) / 255)
            for name in TEXTURES}


def _skimage_data():
    try:
        import skimage.data
    except ImportError as e:
        raise SourceMissing("the faces and textures domains need scikit-image: "
                            "pip install scikit-image (or pip install 'fastmdl[data]')") from e
    return skimage.data


def _idx(directory: str, stem: str) -> torch.Tensor:
    """Read one IDX file (the MNIST format): a magic number giving the element type
    and rank, the dimensions, then the data."""
    for name, opener in ((stem, open), (stem + ".gz", gzip.open)):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with opener(path, "rb") as f:
                raw = f.read()
            break
    else:
        raise FileNotFoundError(os.path.join(directory, stem))
    zero, dtype, rank = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    dims = struct.unpack(f">{rank}I", raw[4:4 + 4 * rank])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: {data.size} values for shape {dims}")
    return torch.from_numpy(data.reshape(dims).copy())
