"""Pure-PyTorch twins of every fastprune op: the ground truth for tests and benchmarks, and the
fallback where no kernel applies. Written for clarity, not speed."""
from .pgd import pgd_step_ref

__all__ = ["pgd_step_ref"]
