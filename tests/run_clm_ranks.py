"""Runs examples/run_clm.py's training under `accelerate launch` and saves what every rank ends up holding.

Each process writes `<output_dir>/rank<i>.safetensors`: all parameters and buffers of its model (W0, POET's Q,
permutations and merge counts, embeddings, norms, lm_head), so a test can compare the ranks bit for bit. Under
FSDP2 every tensor is gathered whole first (a collective, so every rank takes part), and `<output_dir>/rank<i>.json`
says how many bytes of parameters the rank itself holds, against the whole model's.
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from poet_peft.sharding import full_tensor, is_sharded

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import run_clm  # noqa: E402

args = run_clm.parse_args(sys.argv[1:])
run = run_clm.train(args)
accelerator = run["accelerator"]
model = accelerator.unwrap_model(run["model"])
output_dir, rank = Path(args.output_dir), accelerator.process_index
save_file(
    {name: full_tensor(tensor).detach().clone().contiguous() for name, tensor in model.state_dict().items()},
    output_dir / f"rank{rank}.safetensors",
)
parameters = list(model.parameters())
held = sum((p.to_local() if is_sharded(p) else p).nbytes for p in parameters)
(output_dir / f"rank{rank}.json").write_text(
    json.dumps(
        {"parameter_bytes": held, "model_parameter_bytes": sum(p.numel() * p.element_size() for p in parameters)}
    )
)
accelerator.end_training()
