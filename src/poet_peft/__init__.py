"""poet-peft: orthogonal reparameterised training (POET) as a Hugging Face PEFT tuner.

`import poet_peft` registers the PEFT type POET; from then on `get_peft_model(model, POETConfig(...))`,
`PeftModel.from_pretrained` and the rest of PEFT's API work with it.
"""

from .registry import register_tuner
from .tuners.poet import POETConfig, POETLinear, POETModel, poet_layers, poet_parameters

register_tuner("poet", POETConfig, POETModel)

from .training import MergeSchedule, POETCallback, merge_and_reinit, param_groups, reset_optimizer_state  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "MergeSchedule",
    "POETCallback",
    "POETConfig",
    "POETLinear",
    "POETModel",
    "merge_and_reinit",
    "param_groups",
    "poet_layers",
    "poet_parameters",
    "reset_optimizer_state",
]
