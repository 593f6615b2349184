"""The Decathlon devkit's preprocessing (``preprocess="devkit"``): shorter-side
resize, random crops and flips for training, centre crops for evaluation, the
devkit's per-domain statistics read without running the pickle."""

import os
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fastmdl.data import DevkitTrain, decathlon_benchmark, decathlon_domain, load_mean_std
from fastmdl.data.readers import center_crop, resize_shorter


# Each fixture domain's image size after the shorter side goes to 72, by hand.
RESIZED = {"dtd": (86, 72), "gtsrb": (72, 90), "aircraft": (96, 72)}


def _expected_eval(path, name, stats, size=72):
    """What the devkit's evaluation transform gives, computed here by hand."""
    with Image.open(path) as im:
        im = im.convert("RGB").resize(RESIZED[name], Image.BILINEAR)
    w, h = im.size
    top, left = (h - size) // 2, (w - size) // 2
    x = torch.from_numpy(np.asarray(im.crop((left, top, left + size, top + size))).copy())
    x = x.permute(2, 0, 1).float() / 255
    mean = torch.tensor(stats[name + "mean"]).view(3, 1, 1)
    std = torch.tensor(stats[name + "std"]).view(3, 1, 1)
    return (x - mean) / std


def test_shorter_side_resize_and_centre_crop():
    im = Image.new("RGB", (96, 80))
    assert resize_shorter(im, 72).size == (86, 72)  # 96 * 72 / 80 = 86.4, floored
    assert resize_shorter(Image.new("RGB", (80, 100)), 72).size == (72, 90)
    assert resize_shorter(Image.new("RGB", (72, 300)), 72).size == (72, 300)  # already there
    assert center_crop(Image.new("RGB", (86, 72)), 72).size == (72, 72)
    with pytest.raises(ValueError, match="cannot crop 72x72 from a 60x80 image"):
        center_crop(Image.new("RGB", (60, 80)), 72)


def test_train_crops_are_64_and_follow_the_rng(devkit):
    d = decathlon_domain(str(devkit), "dtd", preprocess="devkit")
    draws = []
    for seed in (0, 0, 1, 2):
        torch.manual_seed(seed)
        x, y = d.train[0]
        assert x.shape == (3, 64, 64) and int(y) == 0
        draws.append(x)
    assert torch.equal(draws[0], draws[1])  # same seed, same crop and flip
    assert not torch.equal(draws[0], draws[2]) or not torch.equal(draws[0], draws[3])


def test_eval_crops_are_72_deterministic_and_use_the_pickles_statistics(devkit, mean_std):
    bench = decathlon_benchmark(str(devkit), ["dtd", "gtsrb", "aircraft"], preprocess="devkit")
    assert bench.size == 64 and bench.num_classes == [3, 2, 3]
    for d in bench.domains:
        for split in ("val", "test"):
            torch.manual_seed(0)
            x, _ = d.split(split)[1]
            torch.manual_seed(1)
            again, _ = d.split(split)[1]
            assert x.shape == (3, 72, 72) and torch.equal(x, again)
            expected = _expected_eval(d.split(split).paths[1], d.name, mean_std)
            assert torch.allclose(x, expected, atol=1e-5)
        assert "decathlon_mean_std.pickle" in d.source
    assert [int(bench.domains[0].test[i][1]) for i in range(3)] == [-1] * 3  # unlabelled


def test_flips_happen_except_for_signs_characters_and_digits(tmp_path, write_devkit):
    # 72x72 images cropped at 72: the crop is the whole image, only the flip is random.
    write_devkit(tmp_path, domains={"dtd": ((72, 72), 2), "gtsrb": ((72, 72), 2)})
    for name, flips in (("dtd", True), ("gtsrb", False)):
        d = decathlon_domain(str(tmp_path), name, preprocess="devkit", train_size=72)
        assert d.train.transform.flip is flips
        torch.manual_seed(0)
        outs = [d.train[0][0] for _ in range(40)]
        mirrored = sum(not torch.equal(x, outs[0]) for x in outs)
        if flips:
            assert 5 <= mirrored <= 35  # p = 1/2
            assert all(torch.equal(x, outs[0]) or torch.equal(x, outs[0].flip(-1)) for x in outs)
        else:
            assert mirrored == 0


def test_devkit_train_transform_draws_from_torchs_global_rng():
    im = Image.fromarray(np.arange(90 * 100 * 3, dtype=np.uint8).reshape(90, 100, 3))
    tf = DevkitTrain(72, 64)
    torch.manual_seed(5)
    a = np.asarray(tf(im))
    torch.manual_seed(5)
    b = np.asarray(tf(im))
    assert a.shape == (64, 64, 3) and (a == b).all()


def test_missing_pickle_falls_back_to_imagenet_with_a_warning(tmp_path, write_devkit):
    write_devkit(tmp_path, mean_std=False)
    with pytest.warns(RuntimeWarning, match="decathlon_mean_std.pickle not found") as caught:
        bench = decathlon_benchmark(str(tmp_path), ["dtd", "gtsrb"], preprocess="devkit")
    assert len([w for w in caught if "not found" in str(w.message)]) == 1  # once, not per domain
    x = bench.domains[0].val[0][0]
    assert torch.equal(bench.domains[0].val.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert "ImageNet" in bench.domains[0].source and torch.isfinite(x).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the plain reader never looked for the pickle
        decathlon_domain(str(tmp_path), "dtd", size=8)


def test_domain_missing_from_the_pickle_warns(tmp_path, write_devkit, mean_std):
    write_devkit(tmp_path, domains={"svhn": ((80, 80), 2)}, mean_std=False)
    with pytest.warns(RuntimeWarning, match="'svhnmean'"):
        d = decathlon_domain(str(tmp_path), "svhn", preprocess="devkit", mean_std=mean_std)
    assert d.train.transform.flip is False  # digits are not mirrored
    assert torch.equal(d.val.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


class _Opens:
    """Unpickled by a plain pickle.load, this creates the file at ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_statistics_pickle_never_runs_code(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps({"dtdmean": _Opens(str(marker))}))
    with pytest.raises(ValueError, match=r"evil\.pickle.*global"):
        load_mean_std(evil)
    assert not marker.exists()
    system = tmp_path / "system.pickle"
    system.write_bytes(pickle.dumps(os.system))
    with pytest.raises(ValueError, match=r"system\.pickle.*global .*system"):
        load_mean_std(system)
    # The unpickler is the only guard: a plain load would have run it.
    pickle.loads(evil.read_bytes())["dtdmean"].close()
    assert marker.exists()


@pytest.mark.parametrize("content,match", [
    ([0.1, 0.2], "must hold a dict"),
    ({"dtdmean": "0.5"}, "list of finite numbers"),
    ({"dtdmean": [float("nan")] * 3}, "list of finite numbers"),
    ({1: [0.5]}, "list of finite numbers"),
])
def test_a_statistics_pickle_of_anything_else_is_refused(tmp_path, content, match):
    path = tmp_path / "odd.pickle"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(ValueError, match=match) as e:
        load_mean_std(path)
    assert "odd.pickle" in str(e.value)


def test_statistics_as_python2_wrote_them_and_as_a_dict(tmp_path, devkit, mean_std):
    # Python 2's pickle.dumps({"dtdmean": [0.5]}, 2): the key a byte string (U).
    path = tmp_path / "py2.pickle"
    path.write_bytes(b"\x80\x02}q\x00U\x07dtdmeanq\x01]q\x02G" + struct.pack(">d", 0.5)
                     + b"as.")
    assert load_mean_std(path) == {"dtdmean": [0.5]}
    path.write_bytes(pickle.dumps(mean_std, protocol=0))
    assert load_mean_std(path) == mean_std
    own = dict(mean_std, dtdmean=[0.0, 0.0, 0.0], dtdstd=[1.0, 1.0, 1.0])
    d = decathlon_domain(str(devkit), "dtd", preprocess="devkit", mean_std=own)
    assert torch.equal(d.val.std.flatten(), torch.ones(3))
    assert float(d.val[0][0].min()) >= 0  # [0, 1] pixels, unshifted


def test_bad_arguments_name_themselves(devkit):
    root = str(devkit)
    with pytest.raises(ValueError, match="preprocess must be one of"):
        decathlon_domain(root, "dtd", preprocess="crop")
    with pytest.raises(ValueError, match=r"train_size \(80\) must be <= resize_to \(72\)"):
        decathlon_domain(root, "dtd", preprocess="devkit", train_size=80)
    with pytest.raises(TypeError, match="eval_size must be an int"):
        decathlon_domain(root, "dtd", preprocess="devkit", eval_size=72.0)
    with pytest.raises(TypeError, match="mean_std must be a path, a dict or None"):
        decathlon_domain(root, "dtd", preprocess="devkit", mean_std=3)
    with pytest.raises(FileNotFoundError, match="nowhere.pickle"):
        decathlon_domain(root, "dtd", preprocess="devkit", mean_std=str(devkit / "nowhere.pickle"))
    with pytest.raises(ValueError, match="gtsrb needs 1 or 3 means"):
        decathlon_domain(root, "gtsrb", preprocess="devkit",
                         mean_std={"gtsrbmean": [0.5, 0.5], "gtsrbstd": [0.2, 0.2]})


def test_a_wrong_root_is_an_error_without_a_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FileNotFoundError, match="annotations/dtd_train.json"):
            decathlon_benchmark(str(tmp_path), ["dtd"], preprocess="devkit")


def test_worker_processes_draw_seeded_crops(devkit):
    from torch.utils.data import DataLoader

    d = decathlon_domain(str(devkit), "dtd", preprocess="devkit")

    def batch(seed):
        g = torch.Generator().manual_seed(seed)  # seeds each worker's torch RNG
        return next(iter(DataLoader(d.train, batch_size=6, num_workers=1, generator=g)))[0]

    first = batch(0)
    assert first.shape == (6, 3, 64, 64)
    assert torch.equal(first, batch(0)) and not torch.equal(first, batch(1))
