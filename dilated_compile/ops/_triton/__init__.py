"""Triton kernels and their launchers (CUDA; any device under ``TRITON_INTERPRET=1``)."""
