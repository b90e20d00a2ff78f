"""Triton kernels of fastprune, installed as the package ``fastprune.kernels``.

One module per op family. Each holds ``@triton.jit`` kernels and launchers that only allocate and
launch; argument checking and backend choice live in fastprune/ops.
"""
