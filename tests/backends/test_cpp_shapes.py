"""The C++ CPU kernel against the reference on small images with many filters.

These are the shapes of squeeze-and-excitation layers and of late, small-spatial
stages (1x1 to 7x7 images, up to 1152 filters): each tile holds one or a few
pixels, so the kernel takes its narrow-tile paths (tiles sized by the samples
present, the transposed GEMM for 2 <= tile width < 16, the vectorised NCHW
epilogue and the per-element one). Inputs are fresh random tensors, never zeros;
new tensors start as NaN (``poisoned_empty``) so an unwritten output shows.
"""

import zlib

import pytest
import torch

from fastmdl.ops import domain_conv2d

from problems import Case, check_close, make, require_backend

K1 = dict(k=1, padding=(0, 0))

SMALL_CASES = [
    # squeeze-and-excitation expand and reduce (batch 4, D=3, about half the filters)
    Case("se_expand_1x1", n=4, c_in=40, c_out=1152, hw=(1, 1), **K1),
    Case("se_reduce_1x1", n=4, c_in=1152, c_out=40, hw=(1, 1), **K1),
    Case("se_batch8", n=8, c_in=48, c_out=1152, hw=(1, 1), **K1),
    # a domain with one filter, a domain without samples
    Case("one_filter_and_domain_without_samples_1x1", n=5, c_in=40, c_out=1152, hw=(1, 1),
         domains=[0, 0, 2, 2, 2], out_sizes={0: 1}, **K1),
    Case("batch_of_one_1x1", n=1, c_in=40, c_out=1152, hw=(1, 1), **K1),
    Case("domain_reads_no_channel_1x1", n=6, c_in=40, c_out=300, hw=(1, 1),
         in_sizes={1: 0}, domains=[0, 1, 2, 1, 0, 2], **K1),
    Case("all_filters_one_domain_1x1", n=3, c_in=64, c_out=512, hw=(1, 1),
         out_sizes={0: 512, 1: 0}, domains=[0, 1, 0], **K1),
    # tiles of 2..15 pixels (transposed product) and of 16 or more
    Case("narrow_tiles_2x2", n=9, c_in=64, c_out=512, hw=(2, 2), **K1),
    Case("wide_tiles_4x4", n=6, c_in=96, c_out=384, d=2, hw=(4, 4), **K1),
    Case("many_samples_7x7", n=32, c_in=40, c_out=1152, hw=(7, 7), **K1),
    # 3x3 kernels on images no larger than the kernel (padding inside narrow tiles)
    Case("k3_on_2x2_padding1", n=7, c_in=24, c_out=80, hw=(2, 2), k=3, padding=(1, 1)),
    Case("k3_stride2_on_3x3", n=5, c_in=24, c_out=80, hw=(3, 3), k=3, padding=(1, 1),
         stride=(2, 2)),
    Case("k3_on_1x1_padding1", n=4, c_in=16, c_out=200, hw=(1, 1), k=3, padding=(1, 1)),
    # layouts and no epilogue
    Case("channels_last_2x2", n=6, c_in=40, c_out=576, hw=(2, 2), layout="channels_last", **K1),
    Case("channels_last_4x4", n=6, c_in=40, c_out=576, hw=(4, 4), layout="channels_last", **K1),
    Case("strided_x_2x2", n=6, c_in=40, c_out=576, hw=(2, 2), layout="strided", **K1),
    Case("no_epilogue_1x1", n=4, c_in=40, c_out=1152, hw=(1, 1), epilogue=False, **K1),
    Case("no_epilogue_4x4", n=4, c_in=40, c_out=1152, hw=(4, 4), epilogue=False, **K1),
]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _seed(name, dtype):
    return zlib.crc32(f"{name}/{dtype}".encode()) % 10_000


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.name)
def test_cpp_matches_reference_on_small_images(case, dtype, poisoned_empty):
    require_backend("cpp")
    args = make(case, dtype, "cpu", seed=_seed(case.name, dtype))
    got = domain_conv2d(**args, backend="cpp")
    check_close(got, args)
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (7, 7)])
def test_cpp_with_a_strided_residual(hw, poisoned_empty):
    """A residual that is not contiguous takes the per-element epilogue."""
    require_backend("cpp")
    case = Case("strided_residual", n=5, c_in=40, c_out=576, hw=hw, **K1)
    args = make(case, torch.float32, "cpu", seed=_seed(case.name, hw))
    big = torch.randn(*args["residual"].shape[:3], 2 * hw[1])
    big[..., ::2] = args["residual"]
    args["residual"] = big[..., ::2]
    assert not args["residual"].is_contiguous()
    check_close(domain_conv2d(**args, backend="cpp"), args)


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (4, 4)])
def test_cpp_rows_of_a_mixed_batch_equal_single_sample_calls(hw):
    """Grouping samples of a domain into one tile (and the tile's layout, which
    depends on its width) does not change any sample's result beyond rounding."""
    require_backend("cpp")
    case = Case("rows_small", n=7, c_in=40, c_out=1152, hw=hw, **K1)
    args = make(case, torch.float32, "cpu", seed=_seed(case.name, hw))
    mixed = domain_conv2d(**args, backend="cpp")
    for i in range(case.n):
        one = dict(args, x=args["x"][i:i + 1], domain=args["domain"][i:i + 1],
                   residual=args["residual"][i:i + 1])
        torch.testing.assert_close(domain_conv2d(**one, backend="cpp"), mixed[i:i + 1],
                                   rtol=1e-5, atol=1e-5)


@pytest.fixture
def restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


SPLIT_CASES = [
    Case("split_batch_of_one_7x7", n=1, c_in=64, c_out=512, hw=(7, 7), **K1),
    Case("split_se_batch4_4x4", n=4, c_in=40, c_out=1152, hw=(4, 4), out_sizes={1: 1}, **K1),
    Case("split_narrow_2x2", n=3, c_in=256, c_out=1024, hw=(2, 2), domains=[0, 0, 2], **K1),
    Case("split_k3_channels_last", n=2, c_in=48, c_out=256, hw=(7, 7), k=3, padding=(1, 1),
         layout="channels_last"),
    Case("split_no_input_channels", n=2, c_in=64, c_out=512, hw=(7, 7), in_sizes={0: 0},
         domains=[0, 1], **K1),
]


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: c.name)
def test_cpp_output_channel_blocks(case, threads, restore_threads, poisoned_empty):
    """With fewer tiles than threads the kernel splits each tile's output channels
    into blocks (how many depends on the thread count); every block count gives the
    reference's result."""
    require_backend("cpp")
    torch.set_num_threads(threads)
    args = make(case, torch.float32, "cpu", seed=_seed(case.name, threads))
    got = domain_conv2d(**args, backend="cpp")
    check_close(got, args)
