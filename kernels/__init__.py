"""Triton kernels, one file per op; imported as fastdiff.kernels (see setup.py)."""
