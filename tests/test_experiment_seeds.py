"""benchmarks/experiment_seeds.py: the budget table read over seeds."""

import math

import pytest

import experiment_seeds

DOMAINS = ["fashion", "digits", "faces", "textures"]


def run(seed, ref_acc, row_acc, *, params=0.97, flops=0.77, epochs=6):
    """An experiment.json-like result: baselines at 0.9 each, budget 1.0 at
    ``ref_acc`` on every domain, budget 0.5 at ``row_acc``."""
    def row(name, budget, acc, p, f):
        accs = [acc] * 4
        return {"name": name, "budget": budget, "sharing": None, "accuracy": accs,
                "mean_accuracy": acc, "decathlon": 1000.0 + seed, "params_vs_one": p,
                "flops_vs_one": f, "domain_flops": [f / 2] * 4}
    return {"date": "2026-12-05", "torch": "2.13.0+cpu", "domains": DOMAINS, "epochs": epochs,
            "max_train": 1000, "size": 32, "fill": True, "seed": seed, "backbone_seed": 0,
            "data_seed": 0, "threads": 1, "seconds": 100.0 + seed,
            "rows": [row("4 fine-tuned baselines", None, 0.9, 4.0, 4.0),
                     row("budget 1.0", 1.0, ref_acc, 1.02, 1.0),
                     row("budget 0.5", 0.5, row_acc, params, flops)]}


def test_means_standard_errors_and_the_claim():
    s = experiment_seeds.summarise([run(0, 0.95, 0.94), run(1, 0.93, 0.90),
                                    run(2, 0.94, 0.93)])
    assert s["seeds"] == [0, 1, 2]
    ref = s["rows"][1]
    assert ref["mean_accuracy"]["mean"] == pytest.approx(94.0)
    assert ref["mean_accuracy"]["se"] == pytest.approx(1.0 / math.sqrt(3))
    row = s["rows"][2]
    assert row["cheaper_every_seed"]
    v = row["vs_budget_1"]
    assert v["per_seed"] == pytest.approx([-1.0, -3.0, -1.0])
    assert v["mean"] == pytest.approx(-5 / 3)
    assert v["within_on_mean"] and not v["within_every_seed"]  # seed 1 is 3 points down
    b = row["vs_baselines"]
    assert b["per_seed"] == pytest.approx([4.0, 0.0, 3.0]) and b["within_every_seed"]
    md = experiment_seeds.to_markdown(s)
    assert row["at_budget_every_seed"]  # each domain at 0.77 / 2 of the FLOPs
    assert "| budget 0.5 | yes | yes | -1.7 ± 0.7 | -1.0 -3.0 -1.0 | yes / no |" in md
    assert "94.0 ± 0.6" in md  # budget 1.0's mean over the seeds


def test_a_seed_above_one_network_breaks_cheaper_and_the_budget():
    s = experiment_seeds.summarise([run(0, 0.95, 0.94), run(1, 0.95, 0.94, flops=1.2)])
    assert not s["rows"][2]["cheaper_every_seed"]
    assert not s["rows"][2]["at_budget_every_seed"]  # each domain at 0.6 of the FLOPs


def test_refuses_runs_of_different_recipes_or_repeated_seeds():
    with pytest.raises(ValueError, match="epochs"):
        experiment_seeds.summarise([run(0, 0.9, 0.9), run(1, 0.9, 0.9, epochs=2)])
    with pytest.raises(ValueError, match="own seed"):
        experiment_seeds.summarise([run(0, 0.9, 0.9), run(0, 0.9, 0.9)])
    with pytest.raises(ValueError, match="at least two"):
        experiment_seeds.summarise([run(0, 0.9, 0.9)])


def test_cli_writes_the_report(tmp_path, capsys):
    import json

    paths = []
    for seed in (0, 1):
        p = tmp_path / f"s{seed}.json"
        p.write_text(json.dumps(run(seed, 0.95, 0.94)))
        paths.append(str(p))
    assert experiment_seeds.main(paths + ["--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "experiment_seeds.md").read_text().startswith("Seeds 0, 1")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(run(1, 0.95, 0.94, epochs=2)))
    assert experiment_seeds.main([paths[0], str(bad)]) == 2
    assert "differ in more than the seed: epochs" in capsys.readouterr().err
