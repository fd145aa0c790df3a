"""GLUE's metrics through `evaluate`, offline: the module ships inside this package."""

from __future__ import annotations

from pathlib import Path

GLUE_METRIC_PATH = Path(__file__).resolve().parent / "evaluate_modules" / "glue"


def load_glue_metric(task_name: str, **kwargs):
    """`evaluate.load` of the packaged GLUE metric for a task (cola, sst2, …, rotten_tomatoes); needs `evaluate`."""
    try:
        import evaluate
    except ImportError as error:
        raise ImportError("load_glue_metric needs the evaluate package: pip install 'poet-peft[examples]'") from error
    return evaluate.load(str(GLUE_METRIC_PATH), task_name, **kwargs)
