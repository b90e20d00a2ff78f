"""Pure-PyTorch twins of every fastprune op: the ground truth for tests and benchmarks, and the
fallback where no kernel applies. Written for clarity, not speed."""
from .hsic import (
    gaussian_gram_backward_ref,
    gaussian_gram_ref,
    hsic_from_kernels,
    linear_gram_ref,
    squared_distances_ref,
)
from .pgd import pgd_step_ref

__all__ = [
    "gaussian_gram_backward_ref", "gaussian_gram_ref", "hsic_from_kernels", "linear_gram_ref",
    "pgd_step_ref", "squared_distances_ref",
]
