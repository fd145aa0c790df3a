"""POETConfig: the settings of a POET adapter, validated when it is built."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ...ops.initialization import INITIALIZATIONS
from ..config_checks import check_bool, normalize_module_names

MODES = ("bs", "fs")
MEMORY_MODES = ("recompute", "store")
BASE_DTYPES = ("float32", "bfloat16", "float16")
FORWARD_PATHS = ("auto", "weight", "input")


@dataclass
class POETConfig(PeftConfig):
    """Configuration of POET (arXiv 2506.08001): each targeted weight becomes R·W0·P with learned orthogonal R, P.

    Every field is documented in docs/poet.md.
    """

    block: Union[int, float] = field(
        default=256,
        metadata={"help": "BS: block size b, an integer ≥ 2. FS: the rotated fraction of each dimension, in (0, 1]."},
    )
    mode: Literal["bs", "fs"] = field(
        default="bs", metadata={"help": "'bs' (block-stochastic) or 'fs' (fully stochastic)."}
    )
    neumann_terms: Optional[int] = field(
        default=3,
        metadata={"help": "Neumann terms k in R = (I+Q)(I+Q+…+Q^k); None uses the exact Cayley transform."},
    )
    merge_every: Optional[int] = field(
        default=200, metadata={"help": "T_m: merge-then-reinitialize every this many optimizer steps; None never."}
    )
    merge_orthogonalize: bool = field(
        default=True,
        metadata={"help": "Replace each rotation block by its closest orthogonal matrix before folding it into W0."},
    )
    forward_path: Literal["auto", "weight", "input"] = field(
        default="auto",
        metadata={"help": "'weight' builds R·W0·P, 'input' rotates activations, 'auto' picks the cheaper per call."},
    )
    memory_mode: Literal["recompute", "store"] = field(
        default="recompute",
        metadata={
            "help": "'recompute': a training step saves only the layer's input, as a dense linear does; the "
            "backward rebuilds the rotated input and weight (and the matmul's output where R acts on the "
            "activations) and goes back through the rotations in place, so that a layer's peak stays under a dense "
            "AdamW layer's. 'store' keeps the rotated weight or activations for the backward instead (one rotation "
            "less per backward, weight- or activation-sized tensors held per layer)."
        },
    )
    base_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = field(
        default=None,
        metadata={
            "help": "Store the wrapped layers' W0 in this dtype ('bfloat16' halves POET's largest tensor); None keeps "
            "the base model's. Rotations and merges stay in float32/float64, and with a 16-bit W0 each merge keeps "
            "W0's singular values at their values before the first merge, so rounding cannot accumulate."
        },
    )
    init_weights: Optional[Literal["normalized_gaussian", "uniform_spectrum", "xavier"]] = field(
        default=None,
        metadata={"help": "Redraw W0 for pretraining from scratch; None keeps the base model's weights."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the permutations, index subsets and W0 draws."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (suffix match) or a regex to wrap; None uses the architecture's default."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex never to wrap."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only wrap modules in these layer indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list (e.g. 'layers', 'h') for layers_to_transform."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Other modules to train fully and store in the adapter file."}
    )
    train_in_place: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Other modules to train in full in place, with no frozen copy beside them (unlike "
            "modules_to_save), and store in the adapter file, e.g. embeddings, norms and lm_head when pretraining."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.POET
        normalize_module_names(self)
        check_bool(self, "merge_orthogonalize")
        self._validate()

    def _validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(
                f"POETConfig.mode={self.mode!r} is not a POET mode; valid: 'bs' (block-stochastic, block = an "
                "integer b ≥ 2) or 'fs' (fully stochastic, block = a fraction in (0, 1])."
            )
        is_number = isinstance(self.block, numbers.Real) and not isinstance(self.block, bool)
        if self.mode == "bs" and not (is_number and isinstance(self.block, numbers.Integral) and self.block >= 2):
            hint = " For a fraction of each dimension use mode='fs'." if is_number and 0 < self.block < 1 else ""
            raise ValueError(
                f"POETConfig.block={self.block!r} is invalid for mode='bs': the block size must be an integer ≥ 2 "
                f"and no larger than any targeted dimension.{hint}"
            )
        if self.mode == "fs" and not (is_number and 0 < self.block <= 1):
            raise ValueError(
                f"POETConfig.block={self.block!r} is invalid for mode='fs': it is the rotated fraction of each "
                "dimension and must lie in (0, 1], e.g. 0.5."
            )
        if self.neumann_terms is not None and not (
            isinstance(self.neumann_terms, int) and not isinstance(self.neumann_terms, bool) and self.neumann_terms >= 0
        ):
            raise ValueError(
                f"POETConfig.neumann_terms={self.neumann_terms!r} is invalid: use an integer ≥ 0 (3 is the paper's "
                "choice; 0 gives R = I + Q) or None for the exact Cayley transform."
            )
        if self.merge_every is not None and not (
            isinstance(self.merge_every, int) and not isinstance(self.merge_every, bool) and self.merge_every >= 1
        ):
            raise ValueError(
                f"POETConfig.merge_every={self.merge_every!r} is invalid: use an integer ≥ 1 (the official code "
                "uses 200) or None to never merge."
            )
        if self.init_weights is not None and self.init_weights not in INITIALIZATIONS:
            raise ValueError(
                f"POETConfig.init_weights={self.init_weights!r} is not an initialisation; valid: None (keep the base "
                f"weights), {', '.join(repr(name) for name in INITIALIZATIONS)}."
            )
        if self.forward_path not in FORWARD_PATHS:
            raise ValueError(
                f"POETConfig.forward_path={self.forward_path!r} is invalid; valid: "
                f"{', '.join(repr(name) for name in FORWARD_PATHS)}."
            )
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(
                f"POETConfig.memory_mode={self.memory_mode!r} is invalid; valid: 'recompute' (save only the input, "
                "rebuild the rest in the backward) or 'store' (keep the rotated tensors for the backward)."
            )
        if self.base_dtype is not None and self.base_dtype not in BASE_DTYPES:
            raise ValueError(
                f"POETConfig.base_dtype={self.base_dtype!r} is invalid; valid: None (keep the base model's dtype), "
                f"{', '.join(repr(name) for name in BASE_DTYPES)}."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("POETConfig.layers_pattern only applies together with layers_to_transform.")
