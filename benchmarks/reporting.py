"""What every benchmark does with its result: print it, and append it to a Markdown file when asked."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def publish(report: str, record: Optional[Path]) -> None:
    """Print the report and, if `record` is given, append it to that file after a blank line."""
    print(report)
    if record:
        with record.open("a", encoding="utf-8") as handle:
            handle.write("\n" + report + "\n")
