"""Runs examples/run_clm.py's training under `accelerate launch` and saves what every rank ends up holding.

Each process writes `<output_dir>/rank<i>.safetensors`: all parameters and buffers of its model (W0, POET's Q,
permutations and merge counts, embeddings, norms, lm_head), so a test can compare the ranks bit for bit.
"""

import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import run_clm  # noqa: E402

args = run_clm.parse_args(sys.argv[1:])
run = run_clm.train(args)
accelerator = run["accelerator"]
state = accelerator.unwrap_model(run["model"]).state_dict()
save_file(
    {name: tensor.detach().clone().contiguous() for name, tensor in state.items()},
    Path(args.output_dir) / f"rank{accelerator.process_index}.safetensors",
)
accelerator.end_training()
