"""The op layer: torch.library registrations (``fastprune::<op>``), fake impls and backend choice.

Public functions validate their arguments and raise ValueError naming the bad one.
"""
from .hsic import gaussian_gram, hsic, hsic_bottleneck
from .pgd import pgd_step, pgd_step_

__all__ = ["gaussian_gram", "hsic", "hsic_bottleneck", "pgd_step", "pgd_step_"]
