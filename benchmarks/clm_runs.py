"""What the benchmarks that train through examples/run_clm.py share: one run in a fresh process, and what it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUN_CLM = Path(__file__).resolve().parents[1] / "examples" / "run_clm.py"


def run_clm_process(label: str, flags: list[str], output_dir: Path) -> dict:
    """Run run_clm.py with `flags` into output_dir; its stdout, metrics.jsonl records and final summary.

    Raises with the end of its stderr, naming the run by `label`, if it fails.
    """
    result = subprocess.run(
        [sys.executable, str(RUN_CLM), *flags, "--output_dir", str(output_dir)], capture_output=True, text=True
    )
    if result.returncode:
        raise RuntimeError(f"{label} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    return {"stdout": result.stdout, "records": records, "summary": summary}
