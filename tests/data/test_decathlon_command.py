"""``fastmdl decathlon``: the papers' protocol, end to end on a small devkit tree
(tiny settings: ResNet-26 at width 0.25, one epoch, budgets 1.0 and 0.5)."""

import json
import os
import pickle

import pytest
import torch

import fastmdl
from fastmdl import cli
from fastmdl.decathlon import run
from fastmdl.models import resnet26

TINY = ["--epochs", "1", "--width", "0.25", "--batch-size", "4", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on tiny tensors a second one buys nothing, and on a
    busy machine two OpenMP threads spin waiting for each other (measured on 2
    shared cores: 76 s for a run that takes 4 s on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_command_runs_the_protocol_and_reports_the_score(devkit, tmp_path, capsys):
    out = tmp_path / "report"
    rc = cli.main(["decathlon", str(devkit), "--domains", "dtd", "gtsrb", "aircraft",
                   "--budgets", "0.5", "1.0", "--max-train", "4", "--out", str(out)] + TINY)
    printed = capsys.readouterr().out
    assert rc == 0
    result = json.loads((out / "decathlon.json").read_text())
    assert result["domains"] == ["dtd", "gtsrb", "aircraft"]
    assert result["num_classes"] == [3, 2, 3]
    assert result["images"]["dtd"] == {"train": 4, "val": 3}
    assert "random 64x64 crop, flip" in result["preprocessing"]["dtd"]
    assert "crop;" in result["preprocessing"]["gtsrb"]  # no flip for traffic signs
    assert "decathlon_mean_std.pickle" in result["preprocessing"]["aircraft"]
    assert result["cost_input_size"] == [3, 64, 64] and result["train_weights"] is True
    rows = result["rows"]
    assert [r["budget"] for r in rows] == [1.0, 0.5]  # the reference first
    assert rows[0]["sharing"] is None and rows[1]["sharing"] == "jaccard"
    reference = [1 - a for a in rows[0]["accuracy"]]
    for r in rows:
        assert len(r["accuracy"]) == 3
        assert r["decathlon"] == pytest.approx(
            fastmdl.decathlon_score([1 - a for a in r["accuracy"]], reference))
        assert 0 < r["flops_vs_one"] and 0 < r["params_vs_one"]
    # At budget 1.0 each domain scores 250 (its error is half Emax), or 1000 at zero error.
    assert rows[0]["decathlon"] == pytest.approx(sum(1000 if e == 0 else 250 for e in reference))
    md = (out / "decathlon.md").read_text()
    assert "| model | dtd % | gtsrb % | aircraft % | mean % | decathlon |" in md
    assert "| budget 0.5, jaccard" in md
    # One epoch of two steps cannot bring the masks down to half: the report says so.
    assert rows[1]["over_budget"] and "(over budget)" in md
    assert "still above budget 0.5" in printed
    assert "[1/2] budget 1.0" in printed and "[2/2] budget 0.5, jaccard" in printed
    assert "epoch 1:" in printed and "written to" in printed


def test_a_pretrained_backbone_is_read_weights_only_and_frozen(devkit, tmp_path):
    torch.manual_seed(0)
    net = resnet26(num_classes=7, width=0.25)
    path = tmp_path / "backbone.pt"
    torch.save(net.state_dict(), path)
    result = run(str(devkit), str(tmp_path / "out"), domains=["dtd", "gtsrb"], budgets=[0.5],
                 epochs=1, batch_size=4, width=0.25, backbone=path, device="cpu",
                 progress=False, log=None)
    assert [r["budget"] for r in result["rows"]] == [1.0, 0.5]  # 1.0 added: the reference
    assert result["backbone"] == {"weights": str(path), "num_classes": 7}
    assert result["train_weights"] is False


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# torch.load's own note on the hand-made pickle's protocol: not what is tested.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_bad_backbones_and_options_are_one_line_errors(devkit, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"fc.weight": _Touch(str(marker))}))
    wrong = tmp_path / "wrong.pt"
    torch.save(resnet26(width=0.5).state_dict(), wrong)
    cases = [
        (["--backbone", str(evil)], "weights_only=True"),
        (["--backbone", str(wrong)], "does not fit fastmdl.models.resnet26(width=0.25)"),
        (["--budgets", "1.5"], "budgets must be fractions in (0, 1], got 1.5"),
        (["--domains", "dtd", "dtd"], "must not repeat"),
        (["--domains", "svhn"], "annotations/svhn_train.json not found"),
        (["--max-train", "0"], "max_train must be a positive int"),
        (["--device", "gpu0"], "device must name a torch device"),
    ]
    for extra, message in cases:
        rc = cli.main(["decathlon", str(devkit), "--out", str(tmp_path / "x"),
                       "--domains", "dtd", "gtsrb"] + TINY + extra)
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, (extra, err)
    assert not marker.exists()
    assert not os.path.exists(tmp_path / "x")


def test_unlabelled_val_images_are_refused(devkit, tmp_path):
    ann = devkit / "annotations" / "dtd_val.json"
    doc = json.loads(ann.read_text())
    del doc["annotations"]
    ann.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="dtd's val split has images without labels"):
        run(str(devkit), str(tmp_path / "out"), domains=["dtd"], epochs=1, width=0.25,
            progress=False, log=None)


def test_help_describes_every_option_in_plain_text(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["decathlon", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for option in ("--domains", "--budgets", "--sharing", "--epochs", "--batch-size", "--width",
                   "--backbone", "--train-weights", "--max-train", "--max-eval", "--workers",
                   "--device", "--seed", "--out", "ROOT"):
        assert option in text
    assert "``" not in text and ":func:" not in text and ":class:" not in text
    assert "imagenet12" in text and "1.0 0.75 0.5 0.25" in text
