"""POETCallback: merge-then-reinitialize and the post-merge clip ramp inside transformers.Trainer."""

from __future__ import annotations

from transformers import TrainerCallback

from .merge import MergeSchedule


class POETCallback(TrainerCallback):
    """Runs POET's merge-then-reinitialize every `merge_every` optimizer steps of a transformers Trainer.

    It resets the optimizer state of the Q parameters at each merge and ramps Trainer's gradient clip
    (`max_grad_norm`) up again after it. `merge_every` defaults to the POETConfig's; the ramp's arguments are
    MergeSchedule's.
    """

    def __init__(
        self,
        merge_every: int | None = None,
        clip_ramp_steps: int = 10,
        clip_ramp_start: float = 0.1,
        clip_ramp_until: int | None = None,
    ):
        self.merge_every = merge_every
        self.ramp = (clip_ramp_steps, clip_ramp_start, clip_ramp_until)
        self.schedule = None
        self.max_grad_norm = None  # the user's clip norm, while a train() runs
        self.ramped_norm = None  # what this callback last set it to

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Bind the schedule to the model and optimizer Trainer built."""
        self.schedule = MergeSchedule(model, optimizer, self.merge_every, *self.ramp)
        if self.max_grad_norm is not None and args.max_grad_norm == self.ramped_norm:
            # The last train() ended in an exception mid-ramp (Trainer calls no callback then): undo the ramp.
            args.max_grad_norm = self.max_grad_norm
        self.max_grad_norm = args.max_grad_norm

    def on_step_begin(self, args, state, control, **kwargs):
        """Set this step's clip norm: lower just after a merge."""
        self.ramped_norm = args.max_grad_norm = self.schedule.clip_norm(self.max_grad_norm, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        """Merge when this optimizer step completes a period of merge_every."""
        self.schedule.after_step(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        """Give Trainer back the user's max_grad_norm."""
        args.max_grad_norm, self.max_grad_norm, self.ramped_norm = self.max_grad_norm, None, None
