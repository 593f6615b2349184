"""Readers for the Visual Decathlon devkit and ImageFolder trees, on fixture trees
the tests write themselves."""

import json

import pytest
import torch
from PIL import Image

from fastmdl.data import (decathlon_benchmark, decathlon_domain, image_folder_benchmark,
                          image_folder_domain)


def _image(path, color, size=(20, 14)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _devkit(root, name, splits=("train", "val"), unlabelled=("test",)):
    cats = [{"id": 10002, "name": "b"}, {"id": 10001, "name": "a"}, {"id": 10003, "name": "c"}]
    colors = {10001: (255, 0, 0), 10002: (0, 255, 0), 10003: (0, 0, 255)}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    image_id = 1
    for split in splits + unlabelled:
        images, anns = [], []
        for k in range(6):
            cid = [10001, 10002, 10003][k % 3]
            fname = f"data/{name}/{split}/{image_id:07d}.png"
            _image(root / fname, colors[cid])
            images.append({"id": image_id, "file_name": fname, "width": 20, "height": 14})
            if split not in unlabelled:
                anns.append({"id": image_id, "image_id": image_id, "category_id": cid})
            image_id += 1
        doc = {"images": images, "categories": cats}
        if split not in unlabelled:
            doc["annotations"] = anns
        (root / "annotations" / f"{name}_{split}.json").write_text(json.dumps(doc))


def test_decathlon_devkit(tmp_path):
    _devkit(tmp_path, "dtd")
    _devkit(tmp_path, "aircraft")
    d = decathlon_domain(str(tmp_path), "dtd", size=8)
    assert d.classes == ("a", "b", "c")  # ascending category id
    assert (len(d.train), len(d.val), len(d.test)) == (6, 6, 6)
    x, y = d.train[0]
    assert x.shape == (3, 8, 8) and int(y) == 0
    # Red image, category 10001 -> class 0: the red channel is the high one.
    assert x[0].mean() > x[1].mean() and x[0].mean() > x[2].mean()
    assert [int(d.train[i][1]) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    assert all(int(d.test[i][1]) == -1 for i in range(6))  # the public test set has no labels
    bench = decathlon_benchmark(str(tmp_path), ["dtd", "aircraft"], size=8)
    assert bench.names == ["dtd", "aircraft"] and bench.num_classes == [3, 3]
    x, y = next(iter(bench.loaders("train", batch_size=4)[1]))
    assert x.shape == (4, 3, 8, 8)


def test_decathlon_errors(tmp_path):
    _devkit(tmp_path, "dtd")
    with pytest.raises(FileNotFoundError, match="annotations/vgg-flowers_train.json"):
        decathlon_domain(str(tmp_path), "vgg-flowers")
    (tmp_path / "annotations" / "dtd_val.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="COCO-style"):
        decathlon_domain(str(tmp_path), "dtd")


def test_image_folder_tree(tmp_path):
    for domain in ("sketch", "cubs"):
        for split in ("train", "test"):
            for k, cls in enumerate(["zebra", "ant", "bee"]):
                for i in range(2):
                    _image(tmp_path / domain / split / cls / f"{i}.jpg", (80 * k, 40, 200))
    (tmp_path / "sketch" / "train" / "ant" / "notes.txt").write_text("not an image")
    d = image_folder_domain(str(tmp_path), "sketch", size=12, grey=True)
    assert d.classes == ("ant", "bee", "zebra")
    assert (len(d.train), len(d.val), len(d.test)) == (6, 0, 6)
    x, y = d.train[0]
    assert x.shape == (1, 12, 12) and int(y) == 0
    bench = image_folder_benchmark(str(tmp_path), ["sketch", "cubs"], size=12)
    assert bench.num_classes == [3, 3]
    _image(tmp_path / "cubs" / "test" / "wasp" / "0.jpg", (1, 2, 3))
    with pytest.raises(ValueError, match="wasp"):
        image_folder_domain(str(tmp_path), "cubs")
    with pytest.raises(FileNotFoundError, match="domain directory"):
        image_folder_domain(str(tmp_path), "wikiart")


def test_unreadable_image_names_the_file(tmp_path):
    _image(tmp_path / "d" / "train" / "a" / "0.png", (1, 2, 3))
    (tmp_path / "d" / "train" / "a" / "1.png").write_bytes(b"not a png")
    d = image_folder_domain(str(tmp_path), "d", size=8)
    with pytest.raises(ValueError, match="1.png"):
        d.train[1]
    assert torch.isfinite(d.train[0][0]).all()
