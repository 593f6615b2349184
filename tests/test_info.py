"""`fastmdl info` and the fallbacks it reports, each in a fresh interpreter."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest


def _run(code_or_args, env_changes=None, module=False):
    """Run in a fresh interpreter from a neutral directory, so that a source
    checkout in the current directory cannot shadow the installed package."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_changes or {})
    cmd = [sys.executable] + (["-m"] + code_or_args if module else ["-c", code_or_args])
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                          cwd=tempfile.gettempdir())


def test_python_m_fastmdl_info_lists_every_backend():
    out = _run(["fastmdl", "info"], module=True)
    assert out.returncode == 0, out.stderr
    for word in ("fastmdl", "torch", "triton", "reference", "cpp", "cuda"):
        assert word in out.stdout
    assert "reference  cpu     yes" in out.stdout
    from fastmdl.backends import cpp
    if cpp.status()[0]:  # the installed package has its extension: info must say so
        assert "cpp        cpu     yes" in out.stdout, out.stdout


def test_console_script_matches_module():
    exe = shutil.which("fastmdl", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("the console script is not installed beside this interpreter")
    out = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=300,
                         cwd=tempfile.gettempdir())
    assert out.returncode == 0 and "backend" in out.stdout


def test_missing_extension_falls_back_to_reference_and_says_so_once():
    code = """
import sys, warnings, torch
sys.modules['fastmdl._C'] = None            # as if the extension never built
import fastmdl
from fastmdl.ops import domain_conv2d, index_lists
x = torch.randn(2, 3, 5, 5); w = torch.randn(4, 3, 1, 1)  # 1x1: auto wants cpp
ii, io = index_lists(torch.ones(1, 3)); oi, oo = index_lists(torch.ones(1, 4))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    a = domain_conv2d(x, w, 0, ii, io, oi, oo)
    b = domain_conv2d(x, w, 0, ii, io, oi, oo)
msgs = [str(c.message) for c in caught if 'reference' in str(c.message)]
print(len(msgs)); print(msgs[0])
torch.testing.assert_close(a, torch.nn.functional.conv2d(x, w))
try:
    domain_conv2d(x, w, 0, ii, io, oi, oo, backend='cpp')
except RuntimeError as e:
    print('forced:', e)
"""
    out = _run(code)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "1", out.stdout
    assert "backend 'cpp' is not usable on cpu" in lines[1]
    assert "fastmdl._C" in lines[1]
    assert lines[2].startswith("forced: backend 'cpp' is not usable")


def test_triton_on_cpu_needs_the_interpreter():
    code = """
import torch, fastmdl
from fastmdl.ops import domain_conv2d, index_lists
ii, io = index_lists(torch.ones(1, 3)); oi, oo = index_lists(torch.ones(1, 4))
try:
    domain_conv2d(torch.randn(1, 3, 4, 4), torch.randn(4, 3, 1, 1), 0, ii, io, oi, oo,
                  backend='triton')
except RuntimeError as e:
    print(e)
"""
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout or "not importable" in out.stdout


def test_info_from_an_unbuilt_source_tree_says_so(tmp_path):
    """`python -m fastmdl info` run from a checkout's root imports the source tree
    (no extension, no fastmdl.kernels): info must say that is what it looks at."""
    import fastmdl
    package = os.path.dirname(fastmdl.__file__)
    root = os.path.dirname(package)
    if not os.path.isfile(os.path.join(root, "setup.py")):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copytree(os.path.join(root, "fastmdl"), tmp_path / "fastmdl",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "kernels"))
    shutil.copytree(os.path.join(root, "kernels"), tmp_path / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(root, "setup.py"), tmp_path / "setup.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "fastmdl", "info"], capture_output=True,
                         text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("NOTE: this is the unbuilt source tree at"), out.stdout[:300]
    assert str(tmp_path) in out.stdout


def test_info_of_the_install_has_no_source_tree_note():
    out = _run(["fastmdl", "info"], module=True)
    assert out.returncode == 0 and "unbuilt source tree" not in out.stdout, out.stdout[:300]
