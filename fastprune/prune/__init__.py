"""Pruning methods: HYDRA and its LWM baseline (adversarial), PwoA (no adversarial examples)."""
from .hydra import finetune_phase, hydra, lwm, prune_phase
from .pwoa import block_outputs, distillation_loss, pwoa

__all__ = ["block_outputs", "distillation_loss", "finetune_phase", "hydra", "lwm", "prune_phase", "pwoa"]
