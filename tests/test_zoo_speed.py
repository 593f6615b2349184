"""benchmarks/zoo_speed.py end to end on one small pattern (the real run takes
minutes): every contender is checked against the masked model before it is timed,
and the report says how much was frozen and removed."""

import json

import zoo_speed


def test_grouped_pattern_report(tmp_path):
    assert zoo_speed.main(["--arch", "grouped_bottleneck", "--size", "16", "--n", "4",
                           "--repeats", "1", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "zoo_speed.json").read_text())["rows"][0]
    assert row["arch"] == "grouped_bottleneck"
    # Nothing frozen any more, and each domain's own network drops about half of
    # every group's channels: close to 3/4 of the convolution weights.
    assert row["frozen_held"] == 0.0
    assert 0.6 < row["conv_removed_per_domain"] < 0.8
    assert "| grouped_bottleneck | 0% |" in (tmp_path / "zoo_speed.md").read_text()


def test_a_convolutional_classifier_has_its_per_domain_contender(tmp_path):
    """SqueezeNet's Fire pattern: contender (e) gets each domain's own conv head."""
    assert zoo_speed.main(["--arch", "fire", "--size", "16", "--n", "3", "--repeats", "1",
                           "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "zoo_speed.json").read_text())["rows"][0]
    assert row["arch"] == "fire" and row["frozen_held"] == 0.0
