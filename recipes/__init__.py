"""Runnable recipes: ``python -m recipes.nested_unet``, ``python -m recipes.fashion_mnist``."""

from recipes.openmp import choose_wait_policy

#: How torch's OpenMP threads wait, decided before anything loads torch (see `recipes.openmp`).
WAIT_POLICY = choose_wait_policy()
