"""poet-peft: orthogonal reparameterised training (POET) and its relatives as Hugging Face PEFT tuners.

`import poet_peft` registers the PEFT types POET and ORA; from then on `get_peft_model(model, POETConfig(...))`,
`PeftModel.from_pretrained` and the rest of PEFT's API work with them.
"""

from .registry import register_tuner
from .tuners.ora import ORAConfig, ORALinear, ORAModel, ora_layers
from .tuners.poet import POETConfig, POETLinear, POETModel, poet_layers, poet_parameters

register_tuner("poet", POETConfig, POETModel)
register_tuner("ora", ORAConfig, ORAModel)

from .training import MergeSchedule, POETCallback, merge_and_reinit, param_groups, reset_optimizer_state  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "MergeSchedule",
    "ORAConfig",
    "ORALinear",
    "ORAModel",
    "POETCallback",
    "POETConfig",
    "POETLinear",
    "POETModel",
    "merge_and_reinit",
    "ora_layers",
    "param_groups",
    "poet_layers",
    "poet_parameters",
    "reset_optimizer_state",
]
