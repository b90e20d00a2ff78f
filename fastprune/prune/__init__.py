"""Pruning methods. So far HYDRA and its LWM baseline; PwoA (ADMM, distillation, HSIC) comes next."""
from .hydra import finetune_phase, hydra, lwm, prune_phase

__all__ = ["finetune_phase", "hydra", "lwm", "prune_phase"]
