"""fastmdl._tf32 reads torch's TF32 settings (the per-backend fp32_precision of
torch >= 2.9, whose old allow_tf32 flags are deprecated) as the kernels need them."""

import torch

from fastmdl._tf32 import _resolve, conv_precision, conv_tf32, matmul_tf32


def test_levels_defer_upwards():
    assert _resolve("none", "tf32", "ieee") is True
    assert _resolve("ieee", "tf32") is False
    assert _resolve("none", None, "none") is None


def test_conv_precision_sets_and_restores():
    before = conv_tf32()
    with conv_precision(tf32=not before):
        assert conv_tf32() is (not before)
    assert conv_tf32() is before


def test_matmul_follows_the_setting():
    matmul = torch.backends.cuda.matmul
    if not isinstance(getattr(matmul, "fp32_precision", None), str):
        old = matmul.allow_tf32
        try:
            matmul.allow_tf32 = True
            assert matmul_tf32()
        finally:
            matmul.allow_tf32 = old
        return
    old = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert matmul_tf32()
        matmul.fp32_precision = "ieee"
        assert not matmul_tf32()
    finally:
        matmul.fp32_precision = old
