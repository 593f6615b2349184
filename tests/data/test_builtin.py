"""The built-in benchmark's real sources, splits and failure messages."""

import gzip
import struct

import numpy as np
import pytest
import torch

from fastmdl.data import DOMAINS, SourceMissing, builtin_benchmark, sources


def _bench(**kw):
    try:
        return builtin_benchmark(**kw)
    except SourceMissing as e:
        pytest.skip(f"data source not installed here: {e}")


@pytest.fixture(scope="module")
def bench():
    return _bench(size=16, max_train=400, max_eval=100)


def test_every_domain_is_real_labelled_and_standardised(bench):
    assert bench.names == list(DOMAINS)
    assert bench.num_classes == [10, 10, 2, 3]
    for d in bench.domains:
        for split in ("train", "val", "test"):
            x, y = d.split(split).tensors
            assert x.shape[1:] == (1, 16, 16) and x.dtype == torch.float32
            assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < d.num_classes
            assert len(y) > 0 and x.std() > 0.1  # real images, not constants
        x = d.train.tensors[0]
        assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3
        assert len(set(d.train.tensors[1].tolist())) == d.num_classes  # every class present


def test_splits_are_seeded_and_disjoint(bench):
    again = _bench(size=16, max_train=400, max_eval=100)
    other = _bench(size=16, max_train=400, max_eval=100, seed=1)
    for a, b, c in zip(bench.domains, again.domains, other.domains):
        assert torch.equal(a.train.tensors[0], b.train.tensors[0])
        assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    for d in bench.domains:
        if d.name == "fashion":
            continue  # official splits
        train = {tuple(t.flatten().tolist()) for t in d.train.tensors[0]}
        for split in ("val", "test"):
            held_out = {tuple(t.flatten().tolist()) for t in d.split(split).tensors[0]}
            assert not train & held_out, f"{d.name}: an image is in train and {split}"


def test_loaders_one_per_domain(bench):
    loaders = bench.loaders("train", batch_size=32)
    assert len(loaders) == 4
    x, y = next(iter(loaders[2]))
    assert x.shape == (32, 1, 16, 16)
    assert "| faces | 2 |" in bench.table()


def test_missing_fashion_says_how_to_install(tmp_path):
    with pytest.raises(SourceMissing, match="apt-get install dataset-fashion-mnist"):
        builtin_benchmark(16, domains=["fashion"], fashion_root=str(tmp_path))
    with pytest.warns(RuntimeWarning, match="leaving out domain 'fashion'"):
        b = _bench(size=16, domains=["fashion", "digits"], fashion_root=str(tmp_path),
                   missing="skip")
    assert b.names == ["digits"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="domains"):
        builtin_benchmark(16, domains=["imagenet"])
    with pytest.raises(ValueError, match="size"):
        builtin_benchmark(4)
    with pytest.raises(ValueError, match="missing"):
        builtin_benchmark(16, missing="ignore")
    with pytest.raises(ValueError, match="max_train"):
        builtin_benchmark(16, max_train=0)


def _write_idx(path, array, gz):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader_reads_the_format_and_refuses_truncated_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28))
    labels = rng.integers(0, 10, (5,))
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", 5), ("t10k", 5)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images[:n], gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels[:n], gz)
    data = sources.fashion_mnist(str(tmp_path))
    x, y = data["train"]
    assert torch.allclose(x, torch.from_numpy(images).float() / 255)
    assert y.tolist() == labels.tolist()
    raw = (gzip.open if gz else open)(tmp_path / f"train-images-idx3-ubyte{suffix}", "rb").read()
    with (gzip.open if gz else open)(tmp_path / f"train-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(raw[:-10])
    with pytest.raises(ValueError, match="truncated"):
        sources.fashion_mnist(str(tmp_path))
