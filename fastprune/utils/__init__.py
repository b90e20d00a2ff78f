"""The bottom layer: argument checks and helpers every other layer may use (imports no other part
of fastprune)."""
from .checks import (check_count, check_eps, check_images_labels, check_positive, eval_mode, logits_of,
                     model_dtype)

__all__ = ["check_count", "check_eps", "check_images_labels", "check_positive", "eval_mode", "logits_of",
           "model_dtype"]
