"""Fixtures for tests/data: a small Visual Decathlon devkit written into a test's
tmp_path, in the devkit's layout (annotations/<domain>_<split>.json, COCO-style;
data/<domain>/<split>/*.png; decathlon_mean_std.pickle), with real PNG files of
a noise pattern per class.

- ``devkit``: the default tree (dtd, gtsrb, aircraft; with the pickle), its root;
- ``write_devkit``: the function that writes one, for other layouts;
- ``mean_std``: the statistics the default pickle holds."""

import json
import pickle

import numpy as np
import pytest
from PIL import Image

# Per domain: (width, height) of its images (not square, so the shorter-side
# resize and the crops have work to do), number of classes.
DOMAINS = {"dtd": ((96, 80), 3), "gtsrb": ((80, 100), 2), "aircraft": ((120, 90), 3)}
SPLITS = {"train": 6, "val": 3, "test": 3}  # images per split; test is unlabelled
MEAN_STD = {f"{n}{k}": v for i, n in enumerate(DOMAINS)
            for k, v in (("mean", [0.4 + 0.05 * i, 0.45, 0.5]),
                         ("std", [0.2, 0.25 + 0.01 * i, 0.3]))}


def class_image(rng, label, size):
    """An RGB image: a colour of its class with a noisy horizontal gradient
    (so a left-right flip changes it)."""
    w, h = size
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]][label % 3], dtype=float)
    ramp = np.linspace(-40, 40, w)[None, :, None]
    noise = rng.normal(0, 25, (h, w, 3))
    return Image.fromarray(np.clip(base + ramp + noise, 0, 255).astype(np.uint8), "RGB")


def write_devkit(root, domains=DOMAINS, splits=SPLITS, mean_std=True, seed=0):
    """Write the tree under ``root`` (a pathlib.Path); returns it."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    image_id = 1
    for name, (size, num_classes) in domains.items():
        cats = [{"id": 100 * (k + 1), "name": f"{name}-class{k}"} for k in range(num_classes)]
        for split, count in splits.items():
            images, anns = [], []
            for k in range(count):
                label = k % num_classes
                fname = f"data/{name}/{split}/{image_id:07d}.png"
                (root / fname).parent.mkdir(parents=True, exist_ok=True)
                class_image(rng, label, size).save(root / fname)
                images.append({"id": image_id, "file_name": fname, "width": size[0],
                               "height": size[1]})
                anns.append({"id": image_id, "image_id": image_id,
                             "category_id": cats[label]["id"]})
                image_id += 1
            doc = {"images": images, "categories": cats}
            if split != "test":
                doc["annotations"] = anns
            (root / "annotations" / f"{name}_{split}.json").write_text(json.dumps(doc))
    if mean_std:
        with open(root / "decathlon_mean_std.pickle", "wb") as f:
            pickle.dump(MEAN_STD, f)
    return root


@pytest.fixture(name="write_devkit")
def _write_devkit_fixture():
    return write_devkit


@pytest.fixture
def devkit(tmp_path):
    return write_devkit(tmp_path / "devkit")


@pytest.fixture
def mean_std():
    return {k: list(v) for k, v in MEAN_STD.items()}
