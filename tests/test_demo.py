"""The demo and the experiment end to end, on tiny settings (the real runs take minutes)."""

import json

import pytest

from fastmdl.data import SourceMissing


def _tiny_pretrain(tmp_path):
    return {"epochs": 1, "max_train": 256, "directory": str(tmp_path / "cache")}


def test_demo_writes_its_report(tmp_path):
    from fastmdl.demo import run

    lines = []
    try:
        result = run(str(tmp_path / "out"), epochs=1, max_train=64, max_eval=40, progress=False,
                     log=lines.append, pretrain=_tiny_pretrain(tmp_path))
    except SourceMissing as e:
        pytest.skip(f"data source not installed here: {e}")
    for name in ("report.md", "report.json", "report.png"):
        assert (tmp_path / "out" / name).exists()
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [d["name"] for d in saved["domains"]] == ["fashion", "digits", "faces", "textures"]
    assert all(0 <= d["test_accuracy"] <= 1 for d in saved["domains"])
    assert saved["serving"]["mixed_images_per_s"] > 0
    assert "pruned network (all domains)" in (tmp_path / "out" / "report.md").read_text()
    assert result["backbone"]["reused"] is False
    # A second run reuses the cached backbone.
    again = run(str(tmp_path / "out2"), epochs=1, max_train=64, max_eval=40, progress=False,
                log=lines.append, pretrain=_tiny_pretrain(tmp_path))
    assert again["backbone"]["reused"] is True


def test_experiment_rows(tmp_path):
    from fastmdl.experiment import run

    try:
        result = run(str(tmp_path / "exp"), budgets=(0.5,), sharing=(None, "jaccard"), epochs=1,
                     max_train=64, max_eval=40, progress=False, log=lambda s: None,
                     pretrain=_tiny_pretrain(tmp_path))
    except SourceMissing as e:
        pytest.skip(f"data source not installed here: {e}")
    names = [r["name"] for r in result["rows"]]
    assert names == ["4 fine-tuned baselines", "budget 1.0", "budget 0.5", "budget 0.5, jaccard"]
    base = result["rows"][0]
    assert base["decathlon"] == pytest.approx(250 * 4)  # the baselines score 250 each
    for name in ("experiment.md", "experiment.json", "experiment.png"):
        assert (tmp_path / "exp" / name).exists()
