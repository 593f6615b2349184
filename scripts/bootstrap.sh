#!/usr/bin/env bash
# Set up everything fastmdl needs on a fresh Debian/Ubuntu machine, into ./.venv:
# system packages (a C++ compiler, Python venv support), a CPU build of PyTorch,
# the test and benchmark tools, and fastmdl itself (a regular, non-editable
# install, so the tests exercise what `pip install .` gives a user).
#
#   FASTMDL_TORCH       the torch requirement (default torch==2.13.0)
#   FASTMDL_TORCH_INDEX an index for it, e.g. https://download.pytorch.org/whl/cpu
#                       (PyPI's default Linux torch is the multi-GB CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

need=()
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v "$PYTHON" >/dev/null 2>&1 || need+=(python3 python3-dev)
"$PYTHON" -c "import venv, ensurepip" >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "fastmdl: installing system packages: ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  else
    echo "fastmdl: please install: ${need[*]} (needs root and apt-get)" >&2
    exit 1
  fi
fi

# The built-in benchmark's Fashion-MNIST comes from Debian; without root the data
# tests that need it skip and the demo says how to install it.
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${FASHION_MNIST_DIR:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "fastmdl: installing the Debian package dataset-fashion-mnist"
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist)) ||
      echo "fastmdl: could not install dataset-fashion-mnist; Fashion-MNIST will be missing" >&2
  else
    echo "fastmdl: note: Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist)" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || { echo "fastmdl: creating the virtual environment $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
torch_spec=${FASTMDL_TORCH:-torch==2.13.0}
echo "fastmdl: [1/4] $torch_spec (a first install downloads a few hundred MB; later runs only check it)"
if [ -n "${FASTMDL_TORCH_INDEX:-}" ]; then
  $PIP install "$torch_spec" --index-url "$FASTMDL_TORCH_INDEX"
else
  $PIP install "$torch_spec"
fi
# Build tools first: the extension is built against the torch above (no build
# isolation, which would fetch another torch).
echo "fastmdl: [2/4] build tools (setuptools, wheel, ninja, numpy)"
$PIP install setuptools wheel ninja numpy
echo "fastmdl: [3/4] test, data and serving tools (pytest, triton, scikit-learn, scikit-image, aiohttp, matplotlib)"
$PIP install pytest pytest-benchmark triton tqdm aiohttp scikit-learn scikit-image matplotlib pillow
echo "fastmdl: [4/4] fastmdl with its C++ extension (compiling takes a minute or two the first time)"
$PIP install --no-build-isolation .
echo "fastmdl: environment ready in $VENV"
