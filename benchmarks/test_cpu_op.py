"""pytest-benchmark form of the CPU op benchmark (``make bench-pytest``): each
contender on each ResNet-like layer, N=32 over D=4 domains, half the channels each."""

import pytest
import torch

from fastmdl import backends

from contenders import BASELINES, RESNET_LAYERS, contenders, make_problem

NAMES = [*BASELINES, "cpp"]


@pytest.mark.parametrize("layer", RESNET_LAYERS, ids=lambda l: l[0])
@pytest.mark.parametrize("name", NAMES)
def test_layer(benchmark, layer, name):
    ok, why = backends.status("cpp", "cpu")
    if not ok:
        pytest.skip(why)
    _, c_in, c_out, hw, k, s, pad = layer
    fn = contenders(make_problem(c_in, c_out, hw, k, s, pad), ["cpp"])[name]
    benchmark.group = layer[0]
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=7, warmup_rounds=2)
