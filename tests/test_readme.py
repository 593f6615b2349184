"""Every Python block of README.md runs as pasted, so the README cannot drift from
the code. A block that cannot run here is preceded by a line
``<!-- readme-test: skip: <reason> -->``, and the reason is required."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = re.compile(r"<!-- readme-test: skip: (.+?) -->\s*$")


def python_blocks(text: str):
    """(first line number, code, skip reason or None) of each ```python block."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            before = lines[i - 1] if i else ""
            match = SKIP.match(before.strip())
            out.append((start + 1, "\n".join(lines[start:end]) + "\n",
                        match.group(1) if match else None))
            i = end
        i += 1
    return out


BLOCKS = python_blocks(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read())


def test_the_readme_has_runnable_blocks_and_every_skip_says_why():
    assert sum(reason is None for _, _, reason in BLOCKS) >= 2
    for line, _, reason in BLOCKS:
        assert reason is None or len(reason.split()) >= 3, f"README.md:{line}: say why"


@pytest.mark.parametrize("line,code,reason", BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line, code, reason, tmp_path):
    if reason is not None:
        pytest.skip(f"README.md:{line}: {reason}")
    # From a scratch directory: the block's files land there, and the checkout's
    # source tree cannot shadow the installed package.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"README.md:{line} failed:\n{proc.stderr[-3000:]}"
