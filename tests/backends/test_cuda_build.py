"""The CUDA C++ kernel compiles wherever nvcc is found, GPU or not.

The extension only builds csrc/*.cu with a CUDA build of torch, so on a CPU-only
machine nothing else would notice a kernel that no longer compiles. This test runs
nvcc on csrc/domain_conv2d_cuda.cu alone, with torch's headers and the flags a
torch extension build uses, for sm_80 and sm_90 in one call (both archs'
device passes run in parallel with --threads). It only compiles: nothing links or
runs. The kernel's behaviour is tested on a GPU in tests/backends/test_gpu.py.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import pytest
import torch

from fastmdl import backends

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "csrc", "domain_conv2d_cuda.cu")


def _nvcc():
    from torch.utils import cpp_extension

    found = shutil.which("nvcc")
    if found is None and cpp_extension.CUDA_HOME:
        candidate = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        found = candidate if os.path.exists(candidate) else None
    return found


def _nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _command(nvcc, out_file):
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    cmd = [nvcc, "-c", SOURCE, "-o", out_file, "-std=c++17", "-O2",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-Xcompiler", "-fPIC",
           "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-DFASTMDL_WITH_CUDA"]
    cmd += list(cpp_extension.COMMON_NVCC_FLAGS)  # the half/bfloat16 defines, relaxed constexpr
    cmd += [f"-I{p}" for p in includes]
    if _nvcc_version(nvcc) >= (11, 2):
        cmd += ["--threads", "2"]  # one thread per arch
    return cmd


def test_cuda_kernel_compiles_with_nvcc():
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (not on PATH, no CUDA_HOME): the CUDA kernel is not compiled")
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "domain_conv2d_cuda.o")
        cmd = _command(nvcc, out_file)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            errors = [line for line in proc.stderr.splitlines() if "error" in line]
            pytest.fail(f"nvcc failed ({proc.returncode}):\n{' '.join(cmd)}\n\n"
                        "error lines:\n" + "\n".join(errors[:40])
                        + "\n\nstderr (end):\n" + proc.stderr[-8000:], pytrace=False)
        assert os.path.getsize(out_file) > 0


def test_cuda_backend_refuses_cpu_tensors_and_says_why_it_cannot_run():
    from fastmdl.ops import domain_conv2d, index_lists

    ok, why = backends.status("cuda", "cpu")
    assert not ok and "CUDA tensors" in why
    ii, io = index_lists(torch.ones(1, 3))
    oi, oo = index_lists(torch.ones(1, 4))
    with pytest.raises(RuntimeError, match="backend 'cuda' is not usable for cpu tensors"):
        domain_conv2d(torch.randn(1, 3, 4, 4), torch.randn(4, 3, 1, 1), 0, ii, io, oi, oo,
                      backend="cuda")
    ok, why = backends.status("cuda", "cuda")
    if torch.version.cuda is None:
        assert (ok, why) == (False, "torch is a CPU build")
    elif not torch.cuda.is_available():
        assert not ok and why


if __name__ == "__main__":  # print the command, for building by hand
    print(" ".join(_command(_nvcc() or "nvcc", "domain_conv2d_cuda.o")), file=sys.stderr)
