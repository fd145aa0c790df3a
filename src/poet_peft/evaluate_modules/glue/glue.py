"""GLUE's metrics as a local `evaluate` module, so `evaluate.load(path, task)` works offline.

The numbers are scikit-learn's and scipy's (accuracy_score, f1_score, matthews_corrcoef, pearsonr, spearmanr),
computed here in float64 NumPy so that neither library is needed at run time. The configurations are GLUE's tasks,
each with the metrics GLUE reports for it, and `rotten_tomatoes`, the offline sentiment demo, with accuracy, F1 and
the Matthews correlation.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "GLUE's per-task metrics (Wang et al. 2019), matching scikit-learn and scipy."
_CITATION = """@inproceedings{wang2019glue,
  title={GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={ICLR}, year={2019}
}"""
_INPUTS = """predictions: predicted labels (class ids; similarity scores for stsb). references: the gold labels."""

TASK_METRICS = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "mnli": ("accuracy",),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "ax": ("matthews_correlation",),
    "rotten_tomatoes": ("accuracy", "f1", "matthews_correlation"),
}


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    """The fraction of predictions equal to their reference."""
    return float(np.mean(predictions == references))


def f1(predictions: np.ndarray, references: np.ndarray) -> float:
    """Binary F1 of class 1: 2·TP / (2·TP + FP + FN); 0 when there is no positive at all (sklearn's zero_division)."""
    true_positive = np.sum((predictions == 1) & (references == 1))
    wrong = np.sum(predictions != references)
    denominator = 2 * true_positive + wrong
    return float(2 * true_positive / denominator) if denominator else 0.0


def matthews_correlation(predictions: np.ndarray, references: np.ndarray) -> float:
    """The Matthews correlation coefficient, in its multiclass form (Gorodkin 2004); 0 when it is undefined."""
    classes, encoded = np.unique(np.concatenate([references, predictions]), return_inverse=True)
    truth, predicted = encoded[: len(references)], encoded[len(references) :]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (truth, predicted), 1.0)
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    samples, correct = confusion.sum(), np.trace(confusion)
    covariance = correct * samples - true_counts @ predicted_counts
    scale = (samples**2 - predicted_counts @ predicted_counts) * (samples**2 - true_counts @ true_counts)
    return float(covariance / np.sqrt(scale)) if scale else 0.0


def pearson(predictions: np.ndarray, references: np.ndarray) -> float:
    """Pearson's r; NaN when either side is constant (as scipy)."""
    x, y = predictions - predictions.mean(), references - references.mean()
    scale = np.sqrt((x @ x) * (y @ y))
    return float(np.clip(x @ y / scale, -1.0, 1.0)) if scale else float("nan")


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of their ranks (scipy's rankdata 'average')."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearmanr(predictions: np.ndarray, references: np.ndarray) -> float:
    """Spearman's ρ: Pearson's r of the average ranks; NaN when an input holds NaN (as scipy)."""
    if np.isnan(predictions).any() or np.isnan(references).any():
        return float("nan")
    return pearson(average_ranks(predictions), average_ranks(references))


METRICS = {fn.__name__: fn for fn in (accuracy, f1, matthews_correlation, pearson, spearmanr)}


class Glue(evaluate.Metric):
    """GLUE's metric for the task named by the configuration."""

    def _info(self):
        if self.config_name not in TASK_METRICS:
            raise KeyError(
                f"no GLUE metric for {self.config_name!r}; the configurations are: {', '.join(TASK_METRICS)}"
            )
        value = datasets.Value("float32" if self.config_name == "stsb" else "int64")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": value, "references": value}),
        )

    def _compute(self, predictions, references):
        dtype = np.float64 if self.config_name == "stsb" else np.int64
        predictions, references = np.asarray(predictions, dtype=dtype), np.asarray(references, dtype=dtype)
        return {name: METRICS[name](predictions, references) for name in TASK_METRICS[self.config_name]}
