"""poet-peft: orthogonal reparameterised training (POET) and its relatives as Hugging Face PEFT tuners.

`import poet_peft` registers the PEFT types POET, ORA and SPECTRAL_LORA; from then on
`get_peft_model(model, POETConfig(...))`, `PeftModel.from_pretrained` and the rest of PEFT's API work with them.
"""

import logging
import warnings

# PEFT imports bitsandbytes wherever it is installed (here only with the [bench]/[test] extras, for GaLore), and its
# CPU backend then logs that it could not download an optional kernel from the Hub: noise for every POET user, on
# a path nobody here takes. Set before the tuners import PEFT.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .registry import register_tuner  # noqa: E402
from .tuners.ora import ORAConfig, ORALinear, ORAModel, ora_layers  # noqa: E402
from .tuners.poet import POETConfig, POETLinear, POETModel, poet_layers, poet_parameters  # noqa: E402
from .tuners.spectral_lora import (  # noqa: E402
    SpectralLoRAConfig,
    SpectralLoRALinear,
    SpectralLoRAModel,
    magnitude_parameters,
    spectral_lora_layers,
)

register_tuner("poet", POETConfig, POETModel)
register_tuner("ora", ORAConfig, ORAModel)
register_tuner("spectral_lora", SpectralLoRAConfig, SpectralLoRAModel)
# get_peft_model reads transformers 5's deprecated `is_gradient_checkpointing` for every PEFT method; the
# FutureWarning addresses PEFT's developers, not whoever calls get_peft_model.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

from .export import HubPushError, export_merged, load_merged, save_finetuned  # noqa: E402
from .glue_metric import load_glue_metric  # noqa: E402
from .monitor import MetricsLog, SpectralMonitor, SpectralMonitorCallback  # noqa: E402
from .poetx import convert_from_poetx, convert_to_poetx  # noqa: E402
from .principal import (  # noqa: E402
    PrincipalLinear,
    extract_principal,
    fold_principal,
    matching_linears,
    principal_cores,
)
from .state_files import check_sharded_checkpoint, load_state, save_state  # noqa: E402
from .training import (  # noqa: E402
    MergeSchedule,
    OfficialAdamW,
    POETCallback,
    SpectralClampCallback,
    StableDirections,
    add_param_group,
    clamp_spectral_norms,
    create_param_groups,
    merge_and_reinit,
    reset_optimizer_state,
    summarize_directions,
)

__version__ = "0.1.0"

__all__ = [
    "HubPushError",
    "MergeSchedule",
    "MetricsLog",
    "ORAConfig",
    "ORALinear",
    "ORAModel",
    "OfficialAdamW",
    "POETCallback",
    "POETConfig",
    "POETLinear",
    "POETModel",
    "PrincipalLinear",
    "SpectralClampCallback",
    "SpectralLoRAConfig",
    "SpectralLoRALinear",
    "SpectralLoRAModel",
    "SpectralMonitor",
    "SpectralMonitorCallback",
    "StableDirections",
    "add_param_group",
    "check_sharded_checkpoint",
    "clamp_spectral_norms",
    "convert_from_poetx",
    "convert_to_poetx",
    "create_param_groups",
    "export_merged",
    "extract_principal",
    "fold_principal",
    "load_glue_metric",
    "load_merged",
    "load_state",
    "magnitude_parameters",
    "matching_linears",
    "merge_and_reinit",
    "ora_layers",
    "poet_layers",
    "poet_parameters",
    "principal_cores",
    "reset_optimizer_state",
    "save_finetuned",
    "save_state",
    "spectral_lora_layers",
    "summarize_directions",
]
