"""benchmarks/basis_seeds.py: issue 8's target read over several seeds."""

import json
import statistics

import pytest

import basis_seeds

RECIPE = {"epochs": 5, "ratios": [0.6, 0.75], "retrain_epochs": 2, "teacher": "reference",
          "reference_epochs": 9}


def run(seed, drops, params=(28.0, 29.0, 28.5), test=True, ref=(0.97, 1.0, 0.96), **recipe):
    """A basis_experiment.json-like result whose 0.75 row has these test drops (the
    validation drops are the test drops + 5, so a mix-up of splits shows) and whose
    reference row has the test accuracies ``ref``."""
    def row(method, ratio, d, p):
        acc = [a - x / 100 for a, x in zip(ref, d)]
        r = {"method": method, "basis_ratio": ratio, "drop_points": [x + 5 for x in d],
             "acc": [a - 0.05 for a in acc], "params_pct": list(p)}
        if test:
            r["test"] = {"drop_points": list(d), "acc": acc}
        return r
    settings = {**RECIPE, **recipe, "seed": seed, "date": f"2026-11-{seed + 1:02d}",
                "seconds": 100.0 + seed}
    return {"settings": settings, "domains": ["digits", "faces", "textures"],
            "rows": [row("basis (reference, 9 epochs)", 0.0, [0, 0, 0], [112] * 3),
                     row("basis", 0.6, [9, 9, 9], [45] * 3),
                     row("basis", 0.75, drops, params)]}


def test_the_three_readings():
    s = basis_seeds.summarise([run(0, [0.4, 0.0, 1.5]), run(1, [0.7, 0.0, -0.8]),
                               run(2, [1.5, 0.0, -4.5])])
    assert s["ratio"] == 0.75  # the deepest ratio by default
    assert s["domain_mean_drops"] == pytest.approx([2.6 / 3, 0.0, -3.8 / 3])
    assert s["R1"] and s["R2"] and s["R3"] == [1]
    md = basis_seeds.to_markdown(s)
    assert "| 1 | 71.0% | 0.7 | 0.0 | -0.8 | 0.0 | 0.7 |" in md  # -0.03 prints as 0.0
    assert "| mean over seeds |  | 0.87 | 0.00 | -1.27 | -0.13 | 0.87 |" in md
    assert "- R3 (every domain within 1 point): 1 of 3 seeds (1)" in md
    # Standard errors: sample standard deviation over sqrt(3), per domain and of the
    # seeds' mean drops (0.633, -0.033, -1.0).
    digits = statistics.stdev([0.4, 0.7, 1.5]) / 3 ** 0.5
    means = statistics.stdev([1.9 / 3, -0.1 / 3, -1.0]) / 3 ** 0.5
    assert s["domain_se"] == pytest.approx([digits, 0.0, statistics.stdev([1.5, -0.8, -4.5])
                                            / 3 ** 0.5])
    assert s["mean_drop_se"] == pytest.approx(means)
    assert (f"| standard error of that mean |  | {digits:.2f} | 0.00 | 1.75 | {means:.2f} |  |"
            in md)
    one = basis_seeds.summarise([run(0, [0.4, 0.0, 1.5])])
    assert one["domain_se"] is None and "standard error" not in basis_seeds.to_markdown(one)
    # A seed whose mean drop reaches 1 point breaks R1; a domain whose average does, R2.
    s = basis_seeds.summarise([run(0, [2.0, 1.0, 0.0]), run(1, [-1.0, 0.0, 0.5])])
    assert not s["R1"] and s["R2"] and s["R3"] == [1]
    s = basis_seeds.summarise([run(0, [1.2, -3, 0.0]), run(1, [0.9, 0.0, 0.0])])
    assert s["R1"] and not s["R2"] and s["R3"] == [1]
    # More than 30% of the backbone's params in any domain: nothing is met.
    s = basis_seeds.summarise([run(0, [0.0] * 3, params=(28, 31, 28)), run(1, [0.0] * 3)])
    assert not s["R1"] and not s["R2"] and s["R3"] == [1]
    assert "no reading can be met" in basis_seeds.to_markdown(s)
    # The validation split reads the top-level drops.
    s = basis_seeds.summarise([run(0, [0.0] * 3)], split="val")
    assert s["domain_mean_drops"] == [5.0] * 3 and not s["R2"]


def test_other_ratio_and_runs_from_before_last_retrain_epochs():
    old, new = run(0, [0.0] * 3), run(1, [0.0] * 3, last_retrain_epochs=2)
    s = basis_seeds.summarise([old, new], ratio=0.6)
    assert s["domain_mean_drops"] == [9.0] * 3 and not s["R1"]


def test_runs_of_different_recipes_or_one_seed_twice_are_refused():
    with pytest.raises(ValueError, match="differ in last_retrain_epochs, reference_epochs, "
                                         "retrain_epochs"):
        basis_seeds.summarise([run(0, [0.0] * 3),
                               run(1, [0.0] * 3, retrain_epochs=4, reference_epochs=11)])
    with pytest.raises(ValueError, match="different seed, got seeds \\[0, 0\\]"):
        basis_seeds.summarise([run(0, [0.0] * 3), run(0, [1.0] * 3)])
    with pytest.raises(ValueError, match="at least one"):
        basis_seeds.summarise([])
    with pytest.raises(ValueError, match="split must be"):
        basis_seeds.summarise([run(0, [0.0] * 3)], split="train")
    with pytest.raises(ValueError, match="0 rows of method 'basis' at ratio 0.7"):
        basis_seeds.summarise([run(0, [0.0] * 3)], ratio=0.7)
    with pytest.raises(ValueError, match="not scored on split 'test'"):
        basis_seeds.summarise([run(0, [0.0] * 3, test=False)])


def test_command_line_reads_the_json_files_and_writes_the_table(tmp_path, capsys):
    paths = []
    for seed, drops in ((3, [0.2, 0.0, 0.1]), (4, [0.6, 0.0, -1.0])):
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps(run(seed, drops)))
        paths.append(str(path))
    out = tmp_path / "seeds.md"
    s = basis_seeds.main(paths + ["--out", str(out)])
    assert s["R1"] and s["R2"] and s["R3"] == [3, 4]
    assert out.read_text() == capsys.readouterr().out
    assert "2 seeds" in out.read_text()


def test_compare_pairs_the_seeds_both_recipes_ran(tmp_path, capsys):
    base = [run(0, [0.4, 0.0, 1.5]), run(1, [1.9, 0.0, -1.7]), run(2, [2.2, 0.0, -0.3])]
    new = [run(2, [1.2, 0.0, 0.7], ratios=[0.3, 0.6, 0.75], retrain_epochs=1),
           run(1, [0.4, 0.0, -1.0], ref=(0.94, 1.0, 0.96), ratios=[0.3, 0.6, 0.75],
               retrain_epochs=1),
           run(3, [0.0] * 3, ratios=[0.3, 0.6, 0.75], retrain_epochs=1)]
    c = basis_seeds.compare(base, new)
    assert [p["seed"] for p in c["pairs"]] == [2, 1] and c["unpaired"] == [0, 3]
    assert c["pairs"][0]["change"] == pytest.approx([-1.0, 0.0, 1.0])
    assert c["pairs"][1]["change"] == pytest.approx([-1.5, 0.0, 0.7])
    assert c["mean_change"] == pytest.approx([-1.25, 0.0, 0.85])
    # Seed 1's new reference differs (0.94 on digits): its change mixes recipe and reference.
    assert [p["same_reference"] for p in c["pairs"]] == [True, False]
    # (runs without last_retrain_epochs retrained every cut alike)
    assert c["settings_changed"] == {"ratios": ([0.6, 0.75], [0.3, 0.6, 0.75]),
                                     "retrain_epochs": (2, 1), "last_retrain_epochs": (2, 1)}
    md = basis_seeds.comparison_markdown(c)
    assert "| 2 | yes | 2.2 -> 1.2 (-1.0) | 0.0 -> 0.0 (0.0) | -0.3 -> 0.7 (1.0) |" in md
    assert "| 1 | no | 1.9 -> 0.4 (-1.5) |" in md
    assert "(unpaired: 0, 3)" in md and "retrain_epochs 2 -> 1" in md
    assert "| mean over seeds |  | 2.05 -> 0.80 (-1.25) |" in md
    # On the command line, --against names the base recipe's runs.
    paths = {}
    for name, runs in (("base", base), ("new", new)):
        paths[name] = []
        for r in runs:
            path = tmp_path / f"{name}{r['settings']['seed']}.json"
            path.write_text(json.dumps(r))
            paths[name].append(str(path))
    s = basis_seeds.main(paths["new"] + ["--against"] + paths["base"])
    assert s["comparison"]["mean_change"] == pytest.approx(c["mean_change"])
    assert "Paired by seed" in capsys.readouterr().out


def test_compare_refuses_what_cannot_be_paired():
    base = [run(0, [0.0] * 3)]
    with pytest.raises(ValueError, match="no seed was run by both recipes: base has \\[0\\], "
                                         "new has \\[5\\]"):
        basis_seeds.compare(base, [run(5, [0.0] * 3, retrain_epochs=1)])
    other = run(0, [0.0] * 3)
    other["domains"] = ["a", "b", "c"]
    with pytest.raises(ValueError, match="different domains"):
        basis_seeds.compare(base, [other])
    with pytest.raises(ValueError, match="0 rows of method 'basis' at ratio 0.8"):
        basis_seeds.compare(base, [run(0, [0.0] * 3, ratios=[0.6, 0.8])], ratio=0.8)
