"""When the CUDA kernel must be there: a CUDA build of torch, nvcc, and no
FASTMDL_NO_CUDA=1. Then its absence is a failed build (the GPU tests fail, `fastmdl
info` says MISSING) instead of a skipped backend."""

import os
import stat

import pytest
import torch

from fastmdl.backends import cuda


def _fake_nvcc(tmp_path):
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 0\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return str(nvcc)


def test_expected_needs_a_cuda_torch_and_nvcc(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTMDL_NO_CUDA", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ.get("PATH", ""))
    _fake_nvcc(tmp_path)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    expected, why = cuda.build_expected()
    assert expected and str(tmp_path / "nvcc") in why
    monkeypatch.setenv("FASTMDL_NO_CUDA", "1")
    assert cuda.build_expected() == (
        False, "FASTMDL_NO_CUDA=1: built without the CUDA kernel on purpose")
    monkeypatch.delenv("FASTMDL_NO_CUDA")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert cuda.build_expected() == (False, "torch is a CPU build")


def test_info_and_tests_call_a_missing_expected_kernel_a_failed_build(tmp_path, monkeypatch):
    from fastmdl import backends, info

    if not backends.cpp.status()[0] or cuda.compiled()[0]:
        pytest.skip("needs the C++ extension built without its CUDA kernel (the CPU machine)")
    monkeypatch.delenv("FASTMDL_NO_CUDA", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ.get("PATH", ""))
    _fake_nvcc(tmp_path)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert "the CUDA kernel is MISSING" in info.extension()

    from problems import require_backend

    with pytest.raises(pytest.fail.Exception, match="The CUDA build failed"):
        require_backend("cuda", "cuda")
    monkeypatch.setenv("FASTMDL_NO_CUDA", "1")
    with pytest.raises(pytest.skip.Exception):
        require_backend("cuda", "cuda")
