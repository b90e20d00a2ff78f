"""Training: objectives (natural, PGD-AT, TRADES), the resumable loop, atomic checkpoints."""
from .checkpoint import atomic_save, load_model, save_model
from .loops import fit, train_classifier
from .objectives import MART, OBJECTIVES, TRADES, PGDTraining, make_objective, natural_loss

__all__ = ["MART", "OBJECTIVES", "PGDTraining", "TRADES", "atomic_save", "fit", "load_model", "make_objective",
           "natural_loss", "save_model", "train_classifier"]
