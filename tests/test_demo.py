"""The demo and the experiment end to end, on tiny settings (the real runs take minutes).

The demo runs twice with the same seed and one backbone cache (module fixture):
the first run trains the backbone, the second reads it from the cache, and both
must give the same table; the first run's handover (pruned.fmdl, request.json,
the printed commands) is then served by a real ``fastmdl serve`` process."""

import collections
import http.client
import json
import queue
import re
import shlex
import subprocess
import sys
import threading

import pytest
import torch

import fastmdl
from fastmdl.data import SourceMissing
from test_plot import check_report_png

TIMEOUT = 120  # seconds, for the server to start or answer: generous, never reached
TINY = {"epochs": 1, "max_train": 64, "max_eval": 40, "progress": False}

Run = collections.namedtuple("Run", "dir result lines")


def _tiny_pretrain(tmp_path):
    return {"epochs": 1, "max_train": 256, "directory": str(tmp_path / "cache")}


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """Two tiny demo runs, seed 0, sharing a fresh backbone cache."""
    from fastmdl.demo import run

    tmp = tmp_path_factory.mktemp("demo")
    runs = []
    for name in ("out", "out2"):
        lines = []
        try:
            result = run(str(tmp / name), **TINY, seed=0, log=lines.append,
                         pretrain=_tiny_pretrain(tmp))
        except SourceMissing as e:
            pytest.skip(f"data source not installed here: {e}")
        runs.append(Run(tmp / name, result, lines))
    return runs


def test_demo_writes_its_report(demo_runs):
    first, second = demo_runs
    out = first.dir
    for name in ("report.md", "report.json", "report.png", "pruned.fmdl", "request.json"):
        assert (out / name).exists()
    saved = json.loads((out / "report.json").read_text())
    assert [d["name"] for d in saved["domains"]] == ["fashion", "digits", "faces", "textures"]
    assert all(0 <= d["test_accuracy"] <= 1 for d in saved["domains"])
    assert saved["serving"]["mixed_images_per_s"] > 0 and saved["seed"] == 0
    assert "pruned network (all domains)" in (out / "report.md").read_text()
    check_report_png(str(out / "report.png"))
    assert first.result["backbone"]["reused"] is False
    assert second.result["backbone"]["reused"] is True  # the second run reuses the cache


def _table(result):
    """Everything in a run's table and training log that must not move with the
    same seed: per-domain accuracy and costs, the union's costs, every epoch's
    losses, accuracies and costs, and the request the handover picked."""
    h = result["handover"]
    return {"domains": result["domains"], "union": result["union"],
            "history": result["history"],
            "request": (h["domain"], h["label"], h["class"])}


def test_same_seed_same_table_whether_the_backbone_was_trained_or_cached(demo_runs):
    first, second = demo_runs
    assert _table(first.result) == _table(second.result)  # exact, not approximate
    # ... and the same network: every weight of the two saved models is equal.
    a, b = (fastmdl.load(run.result["handover"]["model"]).state_dict() for run in demo_runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _printed(run):
    """(serve command, curl command, class) from the end of the demo's output."""
    tail = run.lines[-1].splitlines()
    serve, curl = (line.strip() for line in tail if line.strip().startswith(("fastmdl serve",
                                                                            "curl ")))
    answer = re.fullmatch(r'the answer should say "class": (\d+) \(.*\)', tail[-1])
    assert answer, tail[-1]
    return serve, curl, int(answer.group(1))


def test_demo_ends_with_the_commands_that_serve_and_query_its_model(demo_runs):
    run = demo_runs[0]
    h = run.result["handover"]
    assert json.loads((run.dir / "report.json").read_text())["handover"] == h
    assert h["model"] == str((run.dir / "pruned.fmdl").resolve())
    assert h["request"] == str((run.dir / "request.json").resolve())
    serve, curl, cls = _printed(run)
    assert serve == f"fastmdl serve {h['model']} --port 8000"
    assert curl == (f"curl -s localhost:8000/v1/predict -H 'Content-Type: application/json' "
                    f"-d @{h['request']}")
    assert cls == h["class"]


def test_the_saved_model_gives_the_request_image_the_printed_class(demo_runs):
    from fastmdl.data import builtin_benchmark

    run = demo_runs[0]
    h = run.result["handover"]
    _, _, cls = _printed(run)
    model = fastmdl.load(h["model"])
    raw = (run.dir / "request.json").read_bytes()
    assert b"\n" not in raw  # curl -d @file drops newlines: the body is one line
    body = json.loads(raw)
    assert set(body) == {"domain", "image"} and body["domain"] == h["domain"]
    x, d = torch.tensor(body["image"], dtype=torch.float32), body["domain"]
    assert tuple(x.shape) == model.input_size == (1, 32, 32)
    with torch.no_grad():
        logits = model(x[None], d)[0, :model.num_classes[d]]
    assert int(logits.argmax()) == cls
    # A real held-out image: one of that domain's test split, exactly (JSON keeps
    # float32 values whole), with the label the report gives it.
    test = builtin_benchmark(32, seed=0, max_train=TINY["max_train"],
                             max_eval=TINY["max_eval"]).domains[d].test
    rows = (test.tensors[0] == x).flatten(1).all(1)
    assert rows.any() and h["label"] in test.tensors[1][rows].tolist()


def test_fastmdl_serve_as_printed_answers_the_request_with_the_printed_class(demo_runs, tmp_path):
    pytest.importorskip("aiohttp")
    run = demo_runs[0]
    serve, _, cls = _printed(run)
    args = shlex.split(serve)
    assert args[-2:] == ["--port", "8000"]
    # The printed command, on a port the OS picks (8000 may be taken here).
    command = [sys.executable, "-m", "fastmdl", *args[1:-1], "0", "--max-delay-ms", "1"]
    log = open(tmp_path / "stderr.txt", "w+")  # a file: a full pipe could stall the server
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = _read_line(proc, TIMEOUT)
        match = re.search(r"on http://127\.0\.0\.1:(\d+)$", line)
        assert match, f"{line!r}; stderr: {(tmp_path / 'stderr.txt').read_text()}"
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=TIMEOUT)
        try:  # what the printed curl command sends: the file, as JSON
            conn.request("POST", "/v1/predict", body=(run.dir / "request.json").read_bytes(),
                          headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            status, answer = resp.status, json.loads(resp.read())
        finally:
            conn.close()
        assert status == 200, answer
        assert answer["class"] == cls and answer["domain"] == run.result["handover"]["domain"]
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)
        log.close()


def _read_line(proc, timeout):
    """The server's start-up line, or "" if it exits or ``timeout`` passes first."""
    lines = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout).rstrip("\n")
    except queue.Empty:
        return ""


def test_demo_refuses_bad_arguments_naming_them(tmp_path):
    from fastmdl.demo import run

    for kwargs, name in (({"seed": -1}, "seed"), ({"seed": True}, "seed"),
                         ({"seed": 1.5}, "seed"), ({"max_eval": 0}, "max_eval")):
        with pytest.raises(ValueError, match=name):
            run(str(tmp_path / "out"), log=lambda s: None, **kwargs)
    with pytest.raises(ValueError, match="out_dir"):
        run("", log=lambda s: None)
    assert not (tmp_path / "out").exists()  # refused before anything ran


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
