"""Whole tensors from FSDP2's sharded parameters, and writes back into this rank's shard.

Under `torch.distributed.fsdp.fully_shard` a module's parameters are DTensors that hold 1/N of each tensor per rank,
gathered only for the module's forward and backward. Merges, saving and inspection need a layer's whole weight
outside its forward: `full_tensor` gathers it (a collective: every rank calls it, in the same order, as every
rank merges the same layers) and `copy_into` writes a whole result back into the local shard only. Plain tensors
pass through both unchanged, so single-process and DDP code is the same code.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (FSDP2's sharded parameter) rather than a whole tensor."""
    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself, or the whole of a DTensor gathered from every rank."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@torch.no_grad()
def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """`target.copy_(value)` for a whole `value`; into a DTensor only this rank's shard of `value` is written.

    Every rank holds the same `value` (merges are seeded alike on all ranks), so no data is sent.
    """
    if is_sharded(target):
        shard = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None).to_local()
        target.to_local().copy_(shard)
    else:
        target.copy_(value)
