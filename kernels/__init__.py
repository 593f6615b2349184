"""Triton kernels of fastmdl, installed as ``fastmdl.kernels``: one kernel per module,
each with its launch wrapper. Importing this package needs Triton."""
