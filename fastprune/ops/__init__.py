"""The op layer: torch.library registrations (``fastprune::<op>``), fake impls and backend choice.

Public functions validate their arguments and raise ValueError naming the bad one.
"""
from .pgd import pgd_step, pgd_step_

__all__ = ["pgd_step", "pgd_step_"]
