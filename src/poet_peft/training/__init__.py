"""Training helpers: merge-then-reinitialize, optimizer-state reset, parameter groups, the Trainer callback."""

from .callback import POETCallback
from .merge import MergeSchedule, merge_and_reinit, reset_optimizer_state
from .param_groups import param_groups

__all__ = ["MergeSchedule", "POETCallback", "merge_and_reinit", "param_groups", "reset_optimizer_state"]
