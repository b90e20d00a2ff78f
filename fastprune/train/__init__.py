"""Training loops and checkpoints. So far: natural and PGD adversarial training of a classifier on
in-memory data."""
from .checkpoint import atomic_save, load_model, save_model
from .loops import train_classifier

__all__ = ["atomic_save", "load_model", "save_model", "train_classifier"]
