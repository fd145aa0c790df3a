"""What the benchmarks that train through examples/run_clm.py share: one run in a fresh process, and what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RUN_CLM = Path(__file__).resolve().parents[1] / "examples" / "run_clm.py"


def run_clm_process(label: str, flags: list[str], output_dir: Path) -> dict:
    """Run run_clm.py with `flags` into output_dir; its stdout, metrics.jsonl records, final summary and peak RSS.

    Raises with the end of its stderr, naming the run by `label`, if it fails.
    """
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(RUN_CLM), *flags, "--output_dir", str(output_dir)], stdout=stdout, stderr=stderr
        )
        try:  # wait4 gives this child's own resource usage: its peak resident set, in KiB on Linux
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:  # interrupted: leave no training process behind
            process.kill()
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read(), stderr.read()
    if process.returncode:
        raise RuntimeError(f"{label} failed:\n{errors[-3000:]}")
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads(output[output.index("{") : output.rindex("}") + 1])
    return {"stdout": output, "records": records, "summary": summary, "peak_rss_mib": usage.ru_maxrss / 1024}
