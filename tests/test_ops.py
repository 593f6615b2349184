"""Argument checking of fastmdl.ops.domain_conv2d and the index_lists helper."""

import pytest
import torch

from fastmdl.ops import domain_conv2d, index_lists

from problems import Case, make


@pytest.fixture
def args():
    return make(Case("validation", epilogue=True), torch.float32, "cpu", seed=1)


def _call(args, **changes):
    return domain_conv2d(**{**args, **changes})


@pytest.mark.parametrize("changes,error,words", [
    (dict(domain=7), ValueError, "domain 7 is out of range"),
    (dict(domain=torch.tensor([0, 1, 2, 3, 0, 1])), ValueError, "domain id 3 is out of range"),
    (dict(domain=torch.tensor([0, 1, -1, 0, 0, 1])), ValueError, "domain id -1"),
    (dict(domain=torch.zeros(6, dtype=torch.int32)), TypeError,
     "domain must have dtype torch.int64"),
    (dict(domain=torch.zeros(5, dtype=torch.int64)), ValueError, "domain must have shape (N,)"),
    (dict(domain=1.5), TypeError, "domain must be an int or an int64 tensor"),
    (dict(domain=True), TypeError, "domain must be an int"),
    (dict(x=torch.randn(6, 19, 9)), ValueError, "x must be 4-D"),
    (dict(x=torch.randn(6, 19, 9, 9).int()), TypeError, "x must have one of dtypes"),
    (dict(x=[1, 2]), TypeError, "x must be a torch.Tensor"),
    (dict(weight=torch.randn(21, 18, 3, 3)), ValueError, "weight must be (C_out, C_in=19"),
    (dict(weight=torch.randn(21, 19, 3, 3).double()), TypeError,
     "weight must have dtype torch.float32"),
    (dict(weight=torch.randn(21, 19, 3, 3, device="meta")), ValueError,
     "weight must be on x's device"),
    (dict(in_offsets=torch.tensor([0, 3])), ValueError, "out_offsets must have D + 1 = 2"),
    (dict(in_offsets=torch.tensor([0])), ValueError, "in_offsets must have D + 1 >= 2"),
    (dict(in_offsets=torch.tensor([1, 2, 3, 4])), ValueError, "in_offsets must start at 0"),
    (dict(in_index=torch.tensor([0, 0, 1]), in_offsets=torch.tensor([0, 2, 3, 3])), ValueError,
     "in_index must be sorted and unique"),
    (dict(in_index=torch.tensor([2, 1, 0]), in_offsets=torch.tensor([0, 3, 3, 3])), ValueError,
     "in_index must be sorted and unique"),
    (dict(out_index=torch.tensor([0, 21]), out_offsets=torch.tensor([0, 1, 2, 2])), ValueError,
     "out_index entries must lie in [0, 21)"),
    (dict(out_index=torch.tensor([0, 1]), out_offsets=torch.tensor([0, 2, 1, 2])), ValueError,
     "out_offsets must be non-decreasing"),
    (dict(in_index=torch.tensor([0, 1], dtype=torch.int32)), TypeError,
     "in_index must have dtype torch.int64"),
    (dict(scale=torch.randn(2, 21)), ValueError, "scale must be (D, C_out) = (3, 21)"),
    (dict(shift=torch.randn(3, 21).half()), TypeError, "shift must have dtype torch.float32"),
    (dict(residual=torch.randn(6, 21, 8, 9)), ValueError, "residual must have the output's shape"),
    (dict(stride=0), ValueError, "stride entries must be >= 1"),
    (dict(stride=(1, 2, 3)), TypeError, "stride must be an int or a pair"),
    (dict(padding=-1), ValueError, "padding entries must be >= 0"),
    (dict(dilation=1.0), TypeError, "dilation must be an int or a pair"),
    (dict(padding=0, x=torch.randn(6, 19, 2, 2)), ValueError, "too small"),
    (dict(relu=1), TypeError, "relu must be a bool"),
    (dict(backend="cuda-magic"), ValueError, "backend must be one of"),
    (dict(backend=3), TypeError, "backend must be None or a str"),
])
def test_bad_input_names_the_argument(args, changes, error, words):
    with pytest.raises(error) as info:
        _call(args, **changes)
    assert words in str(info.value)


def test_nothing_is_clamped_in_the_cpp_kernel_either(args):
    """Calling the C++ op directly (no Python checks) still refuses bad indices."""
    import fastmdl.backends.cpp as cpp
    if not cpp.status()[0]:
        pytest.skip(cpp.status()[1])
    a = dict(args)
    a["domain"] = torch.tensor([0, 1, 2, 3, 0, 1])
    with pytest.raises(RuntimeError, match="domain id 3 is out of range"):
        torch.ops.fastmdl.domain_conv2d_cpu(
            a["x"], a["weight"], a["domain"], a["in_index"], a["in_offsets"], a["out_index"],
            a["out_offsets"], None, None, None, False, [1, 1], [1, 1], [1, 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpp_backend_refuses_cuda_tensors(args):
    with pytest.raises(RuntimeError, match="C\\+\\+ kernel takes CPU tensors"):
        _call({k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()},
              backend="cpp")


def test_index_lists_round_trip():
    masks = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]])
    index, offsets = index_lists(masks)
    assert index.tolist() == [0, 2, 3, 1]
    assert offsets.tolist() == [0, 3, 3, 4]
    with pytest.raises(TypeError, match="masks must be a 2-D tensor"):
        index_lists(torch.ones(3))
