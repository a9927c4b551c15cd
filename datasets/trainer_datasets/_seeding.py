"""Derive independent, reproducible random streams from tuples of integers."""

from __future__ import annotations

import hashlib

import torch


def mix_seed(*values: int) -> int:
    """A 63-bit seed from `values`; (1, 2) and (2, 1) give unrelated seeds.

    Hashing (rather than e.g. ``seed * K + index``) keeps the streams of nearby tuples apart.
    """
    data = b"".join(int(v).to_bytes(16, "little", signed=True) for v in values)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def generator(*values: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded with ``mix_seed(*values)``."""
    return torch.Generator().manual_seed(mix_seed(*values))
