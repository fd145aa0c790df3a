"""Random draws that depend only on a key, never on global RNG state."""

from __future__ import annotations

import hashlib

import torch


def seeded_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded from a stable hash of `key`: the same draw on every rank, run and resume."""
    digest = hashlib.sha256("|".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
