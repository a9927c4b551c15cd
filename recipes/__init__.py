"""Runnable recipes: ``python -m recipes.nested_unet``, ``python -m recipes.fashion_mnist``."""

# Importing trainer first decides how torch's OpenMP threads wait, before torch loads (see `trainer.openmp`).
from trainer import WAIT_POLICY

__all__ = ["WAIT_POLICY"]
