"""fastmdl.winograd: Winograd F(4x4,3x3) 3x3 convolution with the fused epilogue.

Every result is compared with F.conv2d in float64 on fresh random inputs. The error
measure is max|y - ref| / max|ref| (float32 direct convolution: ~3e-7; this kernel:
~1e-6 .. 1e-5 depending on C_in, see the printed values with -s); the bound is 1e-4.
"""

import pytest
import torch
import torch.nn.functional as F

from fastmdl import winograd

pytestmark = pytest.mark.skipif(not winograd.available(),
                                reason="fastmdl._C with the winograd ops is not built")

TOL = 1e-4


def _case(n, c_in, c_out, h, w, seed, channels_last=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g) * scale + 0.1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = torch.randn(c_out, c_in, 3, 3, generator=g) / (3 * c_in ** 0.5)
    b = torch.randn(c_out, generator=g)
    r = torch.randn(n, c_out, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    return x, wt, b, r


def _reference(x, wt, b, r, relu):
    y = F.conv2d(x.double(), wt.double(), None if b is None else b.double(), padding=1)
    if r is not None:
        y = y + r.double()
    return y.relu() if relu else y


def _rel_err(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


OPS = {
    "auto": lambda x, pk, b, r, relu: winograd.conv3x3(x, pk, b, r, relu),
    "portable": lambda x, pk, b, r, relu: torch.ops.fastmdl.winograd_conv3x3_portable(
        x, pk, b, r, relu),
}

SHAPES = [  # N, C_in, C_out, H, W
    (2, 32, 32, 16, 16),
    (1, 5, 7, 7, 9),      # odd sizes: partial tiles at the bottom and right
    (1, 3, 20, 1, 1),     # a single pixel: everything is padding but the centre
    (2, 48, 40, 2, 3),
    (3, 17, 33, 13, 11),  # channel counts not multiples of 16
    (1, 64, 64, 8, 8),
    (2, 24, 72, 10, 6),   # C_out = 4.5 vectors: a partial last GEMM panel
    (1, 16, 16, 5, 4),
    (1, 1, 1, 3, 3),
    (1, 128, 128, 4, 4),  # one tile: output channels split across threads
    (1, 320, 320, 8, 8),  # transformed weights > 12 MiB: large blocks, channel groups
]


@pytest.mark.parametrize("path", sorted(OPS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias,residual,relu", [
    (False, False, False), (True, False, True), (True, True, True), (False, True, False),
    (True, True, False)])
def test_matches_float64_conv(path, shape, bias, residual, relu):
    n, c_in, c_out, h, w = shape
    x, wt, b, r = _case(n, c_in, c_out, h, w, seed=hash((shape, bias, residual, relu)) % 1000)
    b = b if bias else None
    r = r if residual else None
    pk = winograd.prepack(wt)
    y = OPS[path](x, pk, b, r, relu)
    assert y.shape == (n, c_out, h, w) and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    err = _rel_err(y, _reference(x, wt, b, r, relu))
    print(f"{path} {shape} bias={bias} res={residual} relu={relu}: rel err {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("shape", [(8, 32, 32, 64, 64), (2, 128, 128, 16, 16),
                                   (2, 192, 192, 16, 16), (4, 96, 96, 32, 32),
                                   (1, 200, 100, 12, 20)],
                         ids=lambda s: "x".join(map(str, s)))
def test_target_shapes(shape):
    n, c_in, c_out, h, w = shape
    x, wt, b, r = _case(n, c_in, c_out, h, w, seed=7)
    pk = winograd.prepack(wt)
    for res in (None, r):
        y = winograd.conv3x3(x, pk, b, res, True)
        err = _rel_err(y, _reference(x, wt, b, res, True))
        print(f"{shape} residual={res is not None}: rel err {err:.2e}")
        assert err <= TOL


def test_simd_and_portable_paths_agree():
    x, wt, b, r = _case(2, 40, 56, 9, 14, seed=3)
    pk = winograd.prepack(wt)
    a = winograd.conv3x3(x, pk, b, r, True)
    p = torch.ops.fastmdl.winograd_conv3x3_portable(x, pk, b, r, True)
    assert ((a - p).abs().max() / p.abs().max()).item() < 1e-5


def test_positive_inputs_and_large_values():
    """Post-ReLU activations (all positive, non-zero mean) at a large scale."""
    x, wt, b, r = _case(2, 64, 64, 12, 12, seed=11, scale=100.0)
    x = x.abs()
    pk = winograd.prepack(wt)
    err = _rel_err(winograd.conv3x3(x, pk, b, r, True), _reference(x, wt, b, r, True))
    assert err <= TOL


def test_contiguous_input_is_converted():
    x, wt, b, r = _case(2, 24, 24, 10, 7, seed=5, channels_last=False)
    assert x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    pk = winograd.prepack(wt)
    r_plain = r.contiguous()
    y = winograd.conv3x3(x, pk, b, r_plain, True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert _rel_err(y, _reference(x, wt, b, r, True)) <= TOL
    # the op itself converts as well
    y2 = torch.ops.fastmdl.winograd_conv3x3(x, pk, b, r_plain, True)
    assert torch.equal(y, y2)


def test_strided_views():
    x, wt, b, r = _case(2, 16, 16, 12, 12, seed=9)
    xs = x[:, :, 1:10, 2:11]  # a channels_last view with gaps
    pk = winograd.prepack(wt)
    y = winograd.conv3x3(xs, pk, b, None, False)
    assert _rel_err(y, _reference(xs, wt, b, None, False)) <= TOL


def test_empty_batch_and_zero_input_channels():
    pk = winograd.prepack(torch.randn(8, 4, 3, 3))
    y = winograd.conv3x3(torch.randn(0, 4, 5, 5).contiguous(memory_format=torch.channels_last),
                         pk)
    assert y.shape == (0, 8, 5, 5)
    pk0 = winograd.prepack(torch.randn(8, 0, 3, 3))
    b = torch.randn(8)
    y = winograd.conv3x3(torch.randn(1, 0, 3, 3), pk0, b, None, False)
    assert torch.allclose(y, b.view(1, 8, 1, 1).expand(1, 8, 3, 3))


def test_prepack_layout():
    wt = torch.randn(5, 3, 3, 3)
    pk = winograd.prepack(wt)
    assert pk.shape == (36, 3, 5) and pk.dtype == torch.float32 and pk.is_contiguous()
    G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
                     dtype=torch.float64)
    U = torch.einsum("ak,oikl,bl->abio", G, wt.double(), G).reshape(36, 3, 5)
    assert torch.allclose(pk.double(), U, rtol=1e-6, atol=1e-7)


def test_is_deterministic():
    x, wt, b, r = _case(4, 32, 32, 20, 20, seed=2)
    pk = winograd.prepack(wt)
    assert torch.equal(winograd.conv3x3(x, pk, b, r, True), winograd.conv3x3(x, pk, b, r, True))


def test_thread_counts_agree():
    x, wt, b, r = _case(3, 32, 48, 18, 18, seed=4)
    pk = winograd.prepack(wt)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = winograd.conv3x3(x, pk, b, r, True)
    finally:
        torch.set_num_threads(old)
    many = winograd.conv3x3(x, pk, b, r, True)
    assert torch.allclose(one, many, rtol=1e-5, atol=1e-5)


# --- bad input -------------------------------------------------------------------

def _good():
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    return x, winograd.prepack(torch.randn(4, 8, 3, 3))


def test_bad_dtype():
    x, pk = _good()
    with pytest.raises(TypeError, match="x must be float32"):
        winograd.conv3x3(x.double(), pk)
    with pytest.raises(TypeError, match="weight must be float32"):
        winograd.prepack(torch.randn(4, 8, 3, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="bias must be float32"):
        winograd.conv3x3(x, pk, torch.zeros(4, dtype=torch.float16))
    with pytest.raises(TypeError, match="residual must be float32"):
        winograd.conv3x3(x, pk, None, torch.zeros(1, 4, 6, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match="relu must be a bool"):
        winograd.conv3x3(x, pk, None, None, "yes")
    # the op says so too (TORCH_CHECK_TYPE -> TypeError)
    with pytest.raises(TypeError, match="x must be float32"):
        torch.ops.fastmdl.winograd_conv3x3(x.double(), pk, None, None, False)


def test_bad_kernel_size():
    with pytest.raises(ValueError, match=r"weight must have shape \(C_out, C_in, 3, 3\)"):
        winograd.prepack(torch.randn(4, 8, 5, 5))
    with pytest.raises(ValueError, match=r"weight must have shape"):
        winograd.prepack(torch.randn(4, 8, 3))
    with pytest.raises(ValueError, match=r"weight must have shape"):
        torch.ops.fastmdl.winograd_prepack(torch.randn(4, 8, 1, 1))


def test_bad_channel_count():
    x, pk = _good()
    with pytest.raises(ValueError, match="x has 7 input channels but packed was made for C_in = 8"):
        winograd.conv3x3(torch.randn(1, 7, 6, 6), pk)
    with pytest.raises(ValueError, match="x has 7 input channels"):
        torch.ops.fastmdl.winograd_conv3x3(torch.randn(1, 7, 6, 6), pk, None, None, False)
    with pytest.raises(ValueError, match=r"packed must have shape \(36, C_in, C_out\)"):
        winograd.conv3x3(x, torch.randn(9, 8, 4))
    with pytest.raises(ValueError, match=r"x must be 4-D"):
        winograd.conv3x3(torch.randn(8, 6, 6), pk)


def test_bad_bias_and_residual_shape():
    x, pk = _good()
    with pytest.raises(ValueError, match=r"bias must have shape \(C_out,\) = \(4,\)"):
        winograd.conv3x3(x, pk, torch.zeros(8))
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(1, 4, 6, 6\)"):
        winograd.conv3x3(x, pk, None, torch.zeros(1, 8, 6, 6))
    with pytest.raises(ValueError, match=r"residual must have the output's shape"):
        torch.ops.fastmdl.winograd_conv3x3(x, pk, None, torch.zeros(1, 4, 5, 6), False)
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        winograd.conv3x3(x, pk, None, [1.0])


# --- torch.library -------------------------------------------------------------

@pytest.mark.parametrize("bias,residual,relu", [(True, True, True), (False, False, False),
                                                (True, False, True)])
def test_opcheck_conv(bias, residual, relu):
    x, wt, b, r = _case(2, 20, 12, 7, 9, seed=1)
    pk = winograd.prepack(wt)
    args = (x, pk, b if bias else None, r if residual else None, relu)
    torch.library.opcheck(torch.ops.fastmdl.winograd_conv3x3.default, args)
    torch.library.opcheck(torch.ops.fastmdl.winograd_conv3x3_portable.default, args)


def test_opcheck_prepack():
    torch.library.opcheck(torch.ops.fastmdl.winograd_prepack.default, (torch.randn(6, 5, 3, 3),))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, pk = _good()
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fpk = mode.from_tensor(pk)
        y = torch.ops.fastmdl.winograd_conv3x3(fx, fpk, None, None, True)
        assert y.shape == (1, 4, 6, 6)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert torch.ops.fastmdl.winograd_prepack(torch.empty(4, 8, 3, 3)).shape == (36, 8, 4)


def test_torch_compile():
    x, wt, b, r = _case(1, 16, 16, 8, 8, seed=6)
    pk = winograd.prepack(wt)

    def f(x, pk, b, r):
        return torch.ops.fastmdl.winograd_conv3x3(x, pk, b, r, True) * 2

    try:
        compiled = torch.compile(f, backend="eager", fullgraph=True)
        got = compiled(x, pk, b, r)
    except Exception as exc:  # a torch without a working dynamo
        pytest.skip(f"torch.compile unavailable here: {exc}")
    assert torch.allclose(got, f(x, pk, b, r))
