"""fastmdl.train under torchrun: 2 ranks with gloo on the CPU give the same result
as one process on the same global batches, up to rounding."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_train_job.py")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _run(cmd, env=None):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_two_gloo_ranks_match_one_process(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    _run([sys.executable, JOB, str(one)])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
          "--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
          JOB, str(two)])
    a = torch.load(one, weights_only=True)
    b = torch.load(two, weights_only=True)
    assert (a["world"], b["world"]) == (1, 2)
    assert a["state"].keys() == b["state"].keys()
    moved = 0
    for k, v in a["state"].items():
        if v.is_floating_point():
            torch.testing.assert_close(b["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
        else:
            assert torch.equal(b["state"][k], v), k
    for ra, rb in zip(a["history"], b["history"]):
        assert ra["train_acc"] == pytest.approx(rb["train_acc"], abs=1e-6)
        assert ra["val_acc"] == pytest.approx(rb["val_acc"], abs=1e-6)
        assert ra["cost"] == pytest.approx(rb["cost"], rel=1e-5)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)
    # The run really trained: scores and weights moved from the seeded start.
    torch.manual_seed(0)
    import fastmdl
    from models import TinyResNet
    start = fastmdl.convert(TinyResNet(), 3, [4, 2, 3], input_size=(3, 8, 8)).state_dict()
    for k, v in start.items():
        if v.is_floating_point() and not torch.equal(v, a["state"][k]):
            moved += 1
    assert moved > len(start) // 2
