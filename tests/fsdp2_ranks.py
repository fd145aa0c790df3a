"""POET training under FSDP2 (`fully_shard`, gloo on CPU), launched by tests/test_fsdp2.py with torchrun.

`train` runs 10 AdamW steps of a tiny LLaMA with POET, merging after steps 3, 6 and 9, on a fixed global batch of
4 sequences split evenly over the ranks. Run as a script under torchrun it shards every decoder layer and the root,
and writes `<out>/rank<i>.json` (the global loss of every step and the bytes of W0 this rank holds) and, from rank
0, `<out>/model.safetensors` with every parameter and buffer gathered whole.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import VOCAB, tiny_llama  # noqa: E402

import poet_peft  # noqa: E402
from poet_peft.sharding import full_tensor  # noqa: E402

STEPS, MERGES_AFTER, GLOBAL_BATCH, LENGTH = 10, (3, 6, 9), 4, 16


def poet_model() -> torch.nn.Module:
    """The tiny LLaMA with POET-BS b=16 on its linears and lm_head trained in place, seeded."""
    config = poet_peft.POETConfig(block=16, seed=1, merge_every=None, train_in_place=["lm_head"])
    return get_peft_model(tiny_llama(), config)


def train(model: torch.nn.Module, rank: int, world: int) -> list[float]:
    """The global loss of every step; the model's trained state is left in `model`."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    per_rank = GLOBAL_BATCH // world
    losses = []
    for step in range(1, STEPS + 1):
        batch = torch.randint(0, VOCAB, (GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
        local = batch[rank * per_rank : (rank + 1) * per_rank]
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in MERGES_AFTER:
            poet_peft.merge_and_reinit(model, optimizer)
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        losses.append(total.item())
    return losses


def main(out: Path) -> None:
    """Shard, train, and write what the test compares."""
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = poet_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    losses = train(model, rank, world)
    layers = list(poet_peft.poet_layers(model))
    weights = [layer.get_base_layer().weight for layer in layers]
    local = sum(weight.to_local().nbytes for weight in weights)
    whole = sum(weight.numel() * weight.element_size() for weight in weights)
    (out / f"rank{rank}.json").write_text(json.dumps({"losses": losses, "w0_local": local, "w0_whole": whole}))
    state = {name: full_tensor(t).detach().clone().contiguous() for name, t in model.state_dict().items()}
    if rank == 0:
        save_file(state, out / "model.safetensors")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
