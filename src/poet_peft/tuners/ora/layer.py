"""ORALinear: a Linear or Conv1D whose Q and K output rows are a fixed random projection."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...guards import raise_if_nonfinite
from ...ops.initialization import random_projection
from ...ops.orthogonal import orthogonality_error
from ...ops.seeding import seeded_generator
from ..linear import LinearWeightMixin
from .config import ORAConfig

# The draws' checksum is Σ of their float64 entries in units of 2⁻³², kept as an integer so that casting the model to
# half precision leaves it intact; LAPACKs may differ by rounding, so anything within 2⁻²⁰ counts as the same draw.
CHECKSUM_UNIT = 2.0**-32
CHECKSUM_TOLERANCE = 2**12


class ORALinear(nn.Module, LinearWeightMixin, BaseTunerLayer):
    """A Q or K projection (or a fused [Q; K; V] layer) whose Q and K rows are drawn from a seed.

    The draw is written into the base layer's weight in place and its bias there is zeroed. For a fused layer
    with frozen Q/K, the V rows train as the separate parameters `ora_value_weight` / `ora_value_bias` (a single
    tensor cannot be half frozen), which `merge` writes back into the base weight. `ora_projections` holds the
    (start, stop) output rows of each drawn projection; `ora_draw_checksum` a checksum of the draws, saved with
    the adapter and compared on load, so that weights trained against other draws never load silently.
    """

    adapter_layer_names = ("ora_value_weight", "ora_value_bias")
    other_param_names = ("ora_config", "ora_projections", "ora_draw_checksum")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: ORAConfig, layer_key: str, fused: bool):
        super().__init__()
        self.base_layer = base_layer
        self.layer_key = layer_key
        self._init_linear()
        self.ora_value_weight = nn.ParameterDict()
        self.ora_value_bias = nn.ParameterDict()
        self.ora_config: dict[str, ORAConfig] = {}
        self.ora_projections: dict[str, tuple[tuple[int, int], ...]] = {}
        self.ora_draw_checksum = BufferDict(persistent=True)
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, fused)

    def update_layer(self, adapter_name: str, config: ORAConfig, fused: bool) -> None:
        """Add an ORA adapter: record which rows it replaces; `draw_projections` writes them."""
        rows = self.out_features
        if fused and rows % 3:
            raise ValueError(
                f"ORA cannot split {self.layer_key} into [Q; K; V] thirds: it has {rows} outputs, not a multiple of "
                "3. List only layers laid out like GPT-2's c_attn in fused_qkv_modules."
            )
        third = rows // 3
        self.ora_config[adapter_name] = config
        self.ora_projections[adapter_name] = ((0, third), (third, 2 * third)) if fused else ((0, rows),)
        if fused and not config.trainable_qk:
            bias = self.get_base_layer().bias
            self.ora_value_weight[adapter_name] = nn.Parameter(self.logical_weight()[2 * third :].detach().clone())
            if bias is not None:
                self.ora_value_bias[adapter_name] = nn.Parameter(bias[2 * third :].detach().clone())
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def draw_projections(self, adapter_name: str) -> None:
        """Write the adapter's Q/K draws into the base weight and zero their bias: the same on every device and rank."""
        config = self.ora_config[adapter_name]
        bias = self.get_base_layer().bias
        checksum = 0.0
        for start, stop in self.ora_projections[adapter_name]:
            # Drawn in float64 on a CPU generator and only then cast and moved, so that regenerating from the seed
            # reproduces the weights bit for bit wherever the model lives.
            generator = seeded_generator(config.seed, self.layer_key, start)
            draw = random_projection(config.init, stop - start, self.in_features, generator)
            checksum += draw.sum().item()
            self._write_logical_weight(draw, slice(start, stop))
            if bias is not None:
                bias[start:stop] = 0
        device = self.get_base_layer().weight.device
        self.ora_draw_checksum[adapter_name] = torch.tensor(round(checksum / CHECKSUM_UNIT), device=device)

    def draw_mismatch(self, saved_checksums: dict[str, Optional[torch.Tensor]]) -> Optional[str]:
        """Why saved draw checksums (by adapter, None where absent) do not fit this layer's draws; None if they do."""
        if not self.fixed_parameters():  # trained Q/K are saved and loaded: the draw was only their init
            return None
        for name, saved in saved_checksums.items():
            drawn = int(self.ora_draw_checksum[name])
            if saved is None:
                return f"The adapter has no draw for {self.layer_key}"
            if abs(int(saved) - drawn) > CHECKSUM_TOLERANCE:
                return (
                    f"ORA redrew different Q/K for {self.layer_key} than the adapter was trained with (checksum "
                    f"{drawn * CHECKSUM_UNIT:.9f}, saved {int(saved) * CHECKSUM_UNIT:.9f})"
                )
        return None

    def fixed_parameters(self) -> list[nn.Parameter]:
        """The base layer's parameters that hold frozen Q/K: none when the adapter trains them (trainable_qk)."""
        if any(config.trainable_qk for config in self.ora_config.values()):
            return []
        return [param for param in self.get_base_layer().parameters(recurse=False)]

    def orthogonality_error(self) -> float:
        """Largest ‖WWᵀ − I‖_F over the drawn Q/K matrices (over each stack of ≤ d_in rows when they are taller)."""
        weight = self.logical_weight().double()
        return max(
            orthogonality_error(weight[start:stop][top : top + self.in_features]).item()
            for projections in self.ora_projections.values()
            for start, stop in projections
            for top in range(0, stop - start, self.in_features)
        )

    def _split_value_rows(self) -> Optional[tuple[str, int]]:
        # The active adapter whose V rows train apart from the base weight, and where those rows start; None when
        # the layer applies its base weight as it is (merged, or not a fused layer with frozen Q/K).
        split = [name for name in self.active_adapters if name in self.ora_value_weight]
        if self.merged or not split:
            return None
        return split[0], self.ora_projections[split[0]][-1][1]

    def effective_weight(self) -> torch.Tensor:
        """The (out, in) weight the layer applies now, in float64: for a fused layer, with the V rows trained here."""
        weight = self.logical_weight().double()
        split = self._split_value_rows()
        if split is None:  # as forward: the draws are in the base weight, enabled or not
            return weight
        name, stop = split
        return torch.cat([weight[:stop], self.ora_value_weight[name].double()])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's forward; for a fused layer with frozen Q/K, on [Q; K from the base; V trained here]."""
        split = self._split_value_rows()
        if split is None:
            return self.base_layer(x, *args, **kwargs)
        name, stop = split
        base_weight = self.logical_weight()
        # PEFT keeps adapter parameters of a half-precision model in fp32 (its autocast_adapter_dtype): the V rows
        # train in fp32 and compute in the base layer's dtype.
        value = self.ora_value_weight[name].to(base_weight.dtype)
        weight = torch.cat([base_weight[:stop], value])
        bias = self.get_base_layer().bias
        if bias is not None:
            bias = torch.cat([bias[:stop], self.ora_value_bias[name].to(bias.dtype)])
        return self._base_forward_with(x, weight, bias)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write a fused layer's trained V rows into the base weight (Q/K are there already); NaN or inf is refused."""
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.ora_config:
                continue
            if name in self.ora_value_weight:
                value = self.ora_value_weight[name]
                raise_if_nonfinite([(f"the V weights of {self.layer_key} (adapter {name!r})", value)], "to merge")
                stop = self.ora_projections[name][-1][1]
                self._write_logical_weight(value, slice(stop, None))
                if name in self.ora_value_bias:
                    with torch.no_grad():
                        self.get_base_layer().bias[stop:] = self.ora_value_bias[name]
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Go back to the split forward; the original Q/K are gone (ORA replaced them), so nothing else changes."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "ora." + super().__repr__()
