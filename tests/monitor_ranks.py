"""Runs a SpectralMonitor in every process of an `accelerate launch`, and records what each rank measured.

Each rank trains the same tiny model for 4 DDP steps with the monitor at every=2 and writes
`<output_dir>/rank<i>.json`: the steps at which its after_step returned metrics. Metrics go to
`<output_dir>/spectral_metrics.jsonl` through MetricsLog (no tracker configured).
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

import poet_peft

output_dir = Path(sys.argv[1])
accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(output_dir)))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
model, optimizer = accelerator.prepare(model, optimizer)
monitor = poet_peft.SpectralMonitor(["0", "2"], every=2, topk=3, source="momentum").bind(model, optimizer)
inputs = torch.randn(4, 6, generator=torch.Generator().manual_seed(accelerator.process_index))
measured = []
for step in range(1, 5):
    accelerator.backward(model(inputs).square().mean())
    optimizer.step()
    if monitor.after_step(step, accelerator):
        measured.append(step)
    optimizer.zero_grad()
(output_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(measured))
accelerator.wait_for_everyone()  # rank 1 finishes first (rank 0 measured): let neither tear gloo down under the other
accelerator.end_training()
