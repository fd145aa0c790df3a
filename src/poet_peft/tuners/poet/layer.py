"""POETLinear: a Linear or Conv1D whose weight is R·W0·P, with R and P permuted block-diagonal rotations."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...guards import raise_if_nonfinite
from ...ops import kernels
from ...ops.blocks import (
    BlockLayout,
    BlockRotation,
    block_stochastic_layout,
    fully_stochastic_layout,
    fully_stochastic_size,
    placement_cost,
    rotate_weight,
    rotation_pair,
)
from ...ops.initialization import initial_weight
from ...ops.orthogonal import orthogonality_error
from ...ops.rotated_linear import RotatedLinearPlan, rotated_linear
from ...ops.seeding import seeded_generator
from ...sharding import full_tensor
from ..linear import LinearWeightMixin
from .config import POETConfig


class POETLinear(nn.Module, LinearWeightMixin, BaseTunerLayer):
    """A POET-wrapped torch.nn.Linear or transformers Conv1D: y = R·W0·P·x + bias.

    Per adapter it holds the packed skew parameters of R (`poet_R`, output side) and P (`poet_P`, input side),
    the permutations that place their blocks (`poet_perm_out`, `poet_perm_in`) and how many merges have been
    folded into W0 (`poet_merge_count`). W0 itself is the base layer's weight; `poet_base_rewritten` records,
    for the layer as a whole, whether a merge or a fresh init has made it differ from the base model's, and
    `poet_base_spectrum` holds W0's singular values from before its first merge (zeros until then) for a 16-bit W0,
    whose merges restore them.
    """

    adapter_layer_names = ("poet_R", "poet_P")
    other_param_names = ("poet_perm_out", "poet_perm_in", "poet_merge_count", "poet_config", "poet_layouts")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: POETConfig, layer_key: str):
        super().__init__()
        self.base_layer = base_layer
        self.layer_key = layer_key
        self._init_linear()
        self.poet_R = nn.ParameterDict()
        self.poet_P = nn.ParameterDict()
        self.poet_perm_out = BufferDict(persistent=True)
        self.poet_perm_in = BufferDict(persistent=True)
        self.poet_merge_count = BufferDict(persistent=True)
        self.poet_config: dict[str, POETConfig] = {}
        self.poet_layouts: dict[str, tuple[BlockLayout, BlockLayout]] = {}
        self.register_buffer("poet_base_rewritten", torch.tensor(False, device=self.logical_weight().device))
        spectrum = torch.zeros(min(self.out_features, self.in_features), device=self.logical_weight().device)
        self.register_buffer("poet_base_spectrum", spectrum)
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # -- adapters -------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: POETConfig) -> None:
        """Add a POET adapter: zero skew parameters (so R = P = I) and fresh permutations."""
        layouts = (
            self._layout(config, self.out_features, "out_features"),
            self._layout(config, self.in_features, "in_features"),
        )
        if config.init_weights is not None and self._all_available_adapter_names():
            raise ValueError(
                f"POET cannot add adapter {adapter_name!r} to {self.layer_key} with init_weights="
                f"{config.init_weights!r}: redrawing W0 would break the adapters already built on it "
                f"({', '.join(self._all_available_adapter_names())}). Use init_weights=None."
            )
        weight = self.get_base_layer().weight
        if weight.device.type == "meta":
            # Permutations drawn on meta would hold no values, and materialising the model later (to_empty) leaves
            # them uninitialised: a silently different function.
            raise ValueError(
                f"POET cannot wrap {self.layer_key}: its weight is on the meta device (init_empty_weights), where "
                "the permutations cannot be drawn. Build or load the base model with real weights first; "
                "PeftModel.from_pretrained(..., low_cpu_mem_usage=True) then keeps the adapter's own loading lean."
            )
        self.poet_config[adapter_name] = config
        self.poet_layouts[adapter_name] = layouts
        self.poet_R[adapter_name] = nn.Parameter(
            torch.zeros(layouts[0].num_parameters, dtype=torch.float32, device=weight.device)
        )
        self.poet_P[adapter_name] = nn.Parameter(
            torch.zeros(layouts[1].num_parameters, dtype=torch.float32, device=weight.device)
        )
        self.poet_merge_count[adapter_name] = torch.zeros((), dtype=torch.long, device=weight.device)
        self.poet_perm_out[adapter_name] = torch.empty(self.out_features, dtype=torch.long, device=weight.device)
        self.poet_perm_in[adapter_name] = torch.empty(self.in_features, dtype=torch.long, device=weight.device)
        self._draw_permutations(adapter_name)
        self.set_adapter(self.active_adapters)

    def initialize_base_weight(self, adapter_name: str) -> None:
        """Redraw W0 as the adapter's `init_weights` says (pretraining from scratch); a no-op if it is None."""
        config = self.poet_config[adapter_name]
        if config.init_weights is None:
            return
        generator = seeded_generator(config.seed, self.layer_key, "weight")
        self._write_logical_weight(initial_weight(config.init_weights, self.out_features, self.in_features, generator))
        self.poet_base_rewritten.fill_(True)

    def cast_base_weight(self, dtype: torch.dtype) -> None:
        """Store W0 in `dtype` (the same Parameter, so optimizers and references keep pointing at it)."""
        weight = self.get_base_layer().weight
        if weight.dtype != dtype:
            weight.data = weight.data.to(dtype)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        # PEFT's version also casts to the base weight's dtype; Q must stay float32 next to bf16 weights.
        device = device or self.get_base_layer().weight.device
        stores = (getattr(self, name) for name in self.adapter_layer_names + self.other_param_names)
        for store in (store for store in stores if isinstance(store, (nn.ParameterDict, BufferDict))):
            if adapter_name in store and store[adapter_name].device != torch.device("meta"):
                store[adapter_name] = store[adapter_name].to(device)

    def _layout(self, config: POETConfig, dim: int, side: str) -> BlockLayout:
        if config.mode == "bs":
            if config.block > dim:
                raise ValueError(
                    f"POET cannot wrap {self.layer_key}: block={config.block} is larger than its {side} ({dim}). "
                    f"Valid for this module: 2 ≤ block ≤ {min(self.out_features, self.in_features)}; or leave it "
                    "out with exclude_modules."
                )
            return block_stochastic_layout(dim, config.block)
        if fully_stochastic_size(dim, config.block) < 2:
            raise ValueError(
                f"POET cannot wrap {self.layer_key}: block={config.block} of its {side} ({dim}) rotates fewer than "
                f"2 coordinates. Valid for this module: {1 / min(self.out_features, self.in_features):.4g} < block ≤ 1."
            )
        return fully_stochastic_layout(dim, config.block)

    def _draw_permutations(self, adapter_name: str) -> None:
        config, merges = self.poet_config[adapter_name], int(self.poet_merge_count[adapter_name])
        for side, perms in (("out", self.poet_perm_out), ("in", self.poet_perm_in)):
            generator = seeded_generator(config.seed, self.layer_key, adapter_name, side, merges)
            perms[adapter_name].copy_(torch.randperm(perms[adapter_name].numel(), generator=generator))

    def _active_poet_adapters(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.poet_R]

    def skew_parameters(self) -> list[nn.Parameter]:
        """The packed skew parameters (Q of R, then of P) of the active adapters."""
        return [store[name] for name in self._active_poet_adapters() for store in (self.poet_R, self.poet_P)]

    def rotations(self, adapter_name: str, dtype: Optional[torch.dtype] = None) -> tuple[BlockRotation, BlockRotation]:
        """The adapter's current (R, P) as block rotations, from its skew parameters, in float32 unless `dtype`."""
        return rotation_pair(
            self.poet_layouts[adapter_name],
            (self.poet_perm_out[adapter_name], self.poet_perm_in[adapter_name]),
            (full_tensor(self.poet_R[adapter_name]), full_tensor(self.poet_P[adapter_name])),
            self.poet_config[adapter_name].neumann_terms,
            dtype,
        )

    def rotated_weight(self, adapter_names: list[str], orthogonalize: bool = False) -> torch.Tensor:
        """R·W0·P for the adapters in order (R₂R₁·W0·P₁P₂), in float64; optionally with R, P orthogonalised."""
        weight = self.logical_weight().double()
        for name in adapter_names:
            left, right = self.rotations(name, torch.float64)
            if orthogonalize:
                left, right = left.orthogonalized(), right.orthogonalized()
            weight = rotate_weight(weight, left, right)
        return weight

    def unrotated_weight(self, adapter_names: list[str]) -> torch.Tensor:
        """The exact inverse of `rotated_weight` (block inverses, not transposes: Neumann R is not quite orthogonal)."""
        weight = self.logical_weight().double()
        for name in reversed(adapter_names):
            left, right = self.rotations(name, torch.float64)
            weight = rotate_weight(weight, left.inverse(), right.inverse())
        return weight

    def effective_weight(self) -> torch.Tensor:
        """The (out, in) weight the layer applies now, in float64: R·W0·P for the active adapters, as forward has it."""
        if self.disable_adapters:
            return self.unrotated_weight(self.merged_adapters) if self.merged else self.logical_weight().double()
        if self.merged:
            return self.logical_weight().double()
        return self.rotated_weight(self._active_poet_adapters())

    @torch.no_grad()
    def orthogonality_errors(self) -> tuple[float, float]:
        """‖RRᵀ − I‖_F and ‖PPᵀ − I‖_F of the active adapters' rotations (the largest over adapters), in float64.

        Zero for exact Cayley; Cayley–Neumann's truncation leaves an error that grows with ‖Q‖. The permutations and
        the identity outside the blocks add nothing, so each is the root sum of squares over the blocks.
        """
        errors = [
            [
                math.sqrt(sum(orthogonality_error(group).square().sum().item() for group in rotation.blocks))
                for rotation in self.rotations(name, torch.float64)
            ]
            for name in self._active_poet_adapters()
        ]
        return max((e[0] for e in errors), default=0.0), max((e[1] for e in errors), default=0.0)

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """R·W0·P·x + bias for the active adapters, each rotation applied where it is cheaper."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        adapters = self._active_poet_adapters()
        if self.merged or not adapters:
            return self.base_layer(x, *args, **kwargs)
        weight, bias = self.logical_weight(), self.get_base_layer().bias
        packed = [store[name] for name in adapters for store in (self.poet_R, self.poet_P)]
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias, *packed) if t is not None)
        recompute = training and self.poet_config[adapters[0]].memory_mode == "recompute"
        tokens = x.numel() // x.shape[-1]
        left_on_weight, right_on_weight = self.rotation_sides(
            adapters, tokens, training, input_needs_grad=x.requires_grad, recompute=recompute
        )
        plan = RotatedLinearPlan(
            layouts=tuple(self.poet_layouts[name] for name in adapters),
            perms=tuple((self.poet_perm_out[name], self.poet_perm_in[name]) for name in adapters),
            neumann_terms=tuple(self.poet_config[name].neumann_terms for name in adapters),
            left_on_weight=left_on_weight,
            right_on_weight=right_on_weight,
            linear=self._base_forward_with,
            compute_dtype=torch.promote_types(x.dtype, weight.dtype),  # a 16-bit W0 in a float32 model: float32
        )
        return rotated_linear(plan, x, weight, bias, packed, store=training and not recompute).to(x.dtype)

    def rotation_sides(
        self,
        adapter_names: list[str],
        tokens: int,
        training: bool = False,
        input_needs_grad: bool = False,
        recompute: bool = False,
    ) -> tuple[bool, bool]:
        """Whether R and whether P go on the weight (weight-centric) rather than on the activations (input-centric).

        With forward_path="auto" on the torch path the four combinations are costed (`placement_cost`: flops plus
        the permutations' data movement, summed over the adapters) and the cheapest wins, ties going to the weight.
        Training matters: a weight-centric side needs the weight gradient of the matmul, which the input-centric
        path never computes for the frozen W0; and with `recompute` (memory_mode="recompute") the backward runs the
        forward's rotations again, and the matmul too where R acts on the outputs.
        """
        forced = self.poet_config[adapter_names[0]].forward_path
        if forced != "auto":
            return forced == "weight", forced == "weight"
        layouts = [self.poet_layouts[name] for name in adapter_names]
        sizes = [size for pair in layouts for layout in pair for size in layout.sizes]
        forced_kernels = kernels.kernel_mode() == "cuda"
        if forced_kernels and kernels.use_kernels(self._stored_logical_weight(), sizes):  # no FSDP2 gather
            # The fused CUDA kernels have no separate gathers: forced onto them, each side goes where its rotation
            # touches fewer vectors. Under "auto" the kernels run only where measured faster than the torch path,
            # which the cost model below describes.
            return self.in_features <= tokens, self.out_features <= tokens
        choices = [(True, True), (True, False), (False, True), (False, False)]
        return min(
            choices,
            key=lambda sides: sum(
                placement_cost(left, right, tokens, sides, training, input_needs_grad, recompute)
                for left, right in layouts
            ),
        )

    # -- PEFT merge / unmerge -------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write R·W0·P into the base weight (PEFT's merge; NaN or inf is refused); `unmerge` restores W0 exactly."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.poet_R:
                continue
            merged = self.rotated_weight([name]).to(self.get_base_layer().weight.dtype)
            raise_if_nonfinite([(f"the merged weight of {self.layer_key} (adapter {name!r})", merged)], "to merge")
            self._write_logical_weight(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo `merge` with exact inverses of R and P."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.poet_R:
                self._write_logical_weight(self.unrotated_weight([name]))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """R·W0·P − W0: what merging this adapter adds to the (out, in) weight."""
        weight = self.logical_weight()
        return self.rotated_weight([adapter_name]).to(weight.dtype) - weight

    # -- POET merge-then-reinitialize -----------------------------------------------------------------------
    def raise_unless_mergeable(self) -> None:
        """Raise before merge_and_reinit would fold non-finite rotations, or change an inactive adapter's function."""
        active = self._active_poet_adapters()
        for name in active:
            skews = (full_tensor(self.poet_R[name]), full_tensor(self.poet_P[name]))
            if not all(torch.isfinite(skew).all() for skew in skews):
                # Folding NaN or inf into W0 would destroy it for good: stop while every W0 is still intact.
                raise FloatingPointError(
                    f"POET cannot merge {self.layer_key}: adapter {name!r} has non-finite skew parameters, so "
                    "training diverged. No W0 was changed; lower the POET lr (or max_grad_norm) and resume from "
                    "an earlier checkpoint."
                )
        inactive = sorted(set(self.poet_R) - set(active))
        if active and inactive:
            raise ValueError(
                f"POET cannot merge {self.layer_key}: folding the active adapter(s) {', '.join(active)} into W0 "
                f"would change what the inactive adapter(s) {', '.join(inactive)} compute, since they build on the "
                "same W0. No W0 was changed; delete them first (delete_adapter), or make them active too "
                "(set_adapter([...])) so that they merge together."
            )

    @torch.no_grad()
    def merge_and_reinit(self) -> None:
        """POET's merge: fold each active adapter's R, P into W0, zero its skew parameters, redraw its permutations."""
        if self.merged:
            raise RuntimeError(
                f"{self.layer_key} is merged through PEFT's merge(); call unmerge() before merge_and_reinit()."
            )
        self.raise_unless_mergeable()
        for name in self._active_poet_adapters():
            # Folded in float64: hundreds of merges must not add up rounding errors in W0's spectrum.
            orthogonalize = self.poet_config[name].merge_orthogonalize
            folded = self._with_base_spectrum(self.rotated_weight([name], orthogonalize))
            folded = folded.to(self.get_base_layer().weight.dtype)
            # A 16-bit W0 can overflow where a rotation gathers large entries: keep this layer's W0 and Q then.
            raise_if_nonfinite([(f"the merged W0 of {self.layer_key} (adapter {name!r})", folded)], "to merge")
            self._write_logical_weight(folded)
            self.poet_R[name].zero_()
            self.poet_P[name].zero_()
            self.poet_merge_count[name] += 1
            self._draw_permutations(name)
            self.poet_base_rewritten.fill_(True)

    def _with_base_spectrum(self, folded: torch.Tensor) -> torch.Tensor:
        # Rounding a 16-bit W0 after every merge moves its singular values a little each time, and the moves add up
        # (7e-3 of σ_max in 200 bf16 merges). POET keeps the spectrum in exact arithmetic, so put back the singular
        # values W0 had before its first merge: the error is then one rounding's, however many merges there are.
        if self.get_base_layer().weight.dtype.itemsize >= 4:
            return folded
        if not self.poet_base_spectrum.any():  # the first merge
            self.poet_base_spectrum.copy_(torch.linalg.svdvals(self.logical_weight().float()))
        left, _, right = torch.linalg.svd(folded.float(), full_matrices=False)
        return (left * self.poet_base_spectrum.to(left.dtype)) @ right

    def base_weight_for_saving(self) -> torch.Tensor:
        """W0 in the base layer's own storage convention, with any PEFT merge undone."""
        weight = self.unrotated_weight(self.merged_adapters) if self.merged else self.logical_weight()
        weight = weight.to(self.get_base_layer().weight.dtype)
        return weight.t() if self.fan_in_fan_out else weight

    def __repr__(self) -> str:
        return "poet." + super().__repr__()
