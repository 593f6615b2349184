"""Shared test set-up.

Without a CUDA device, Triton kernels run in its CPU interpreter, which Triton
reads from TRITON_INTERPRET when the kernels are first imported: set it before
anything imports them.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
