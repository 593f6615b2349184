"""Which backend backend=None picks."""

import torch

from fastmdl import backends


def test_cpu_auto_picks_cpp_for_1x1_and_the_reference_for_larger_kernels():
    assert backends._auto("cpu", torch.float32, 9) == "reference"
    expected = "cpp" if backends.status("cpp", "cpu")[0] else "reference"
    assert backends._auto("cpu", torch.float32, 1) == expected
    assert backends.resolve("auto", torch.device("cpu"), torch.float32, 9) is \
        backends._IMPLS["reference"]
