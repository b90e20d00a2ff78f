"""Modules built on fastprune's ops."""
from .hsic import FeatureTaps, HSICBottleneck

__all__ = ["FeatureTaps", "HSICBottleneck"]
