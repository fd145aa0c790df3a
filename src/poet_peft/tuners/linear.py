"""What the tuners share: Linear/Conv1D base layers seen as (out, in) weights, and safe injection."""

from __future__ import annotations

from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import _get_submodules
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..guards import raise_if_nonfinite, raise_if_tied
from ..sharding import copy_into, full_tensor, is_sharded

SUPPORTED_LAYERS = (nn.Linear, Conv1D)


def linear_layer_names(model: nn.Module) -> str:
    """The distinct last names of a model's Linear and Conv1D layers, for error messages."""
    names = sorted(
        {name.rpartition(".")[2] for name, module in model.named_modules() if isinstance(module, SUPPORTED_LAYERS)}
    )
    return ", ".join(names) if names else "(none)"


class LinearWeightMixin:
    """Access to a wrapped Linear or Conv1D base layer's weight as an (out, in) matrix."""

    def _init_linear(self) -> None:
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)  # Conv1D stores its weight as (in, out)
        self.out_features, self.in_features = self.logical_weight().shape

    def _stored_logical_weight(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        return weight.t() if self.fan_in_fan_out else weight

    def logical_weight(self) -> torch.Tensor:
        """The base weight as an (out, in) matrix, whatever the base layer's storage convention; whole under FSDP2
        (gathered from the ranks' shards outside the forward, so every rank must ask for it alike)."""
        return full_tensor(self._stored_logical_weight())

    def _write_logical_weight(self, weight: torch.Tensor, rows: slice = slice(None)) -> None:
        # In place, so that optimizers, DDP buckets and tied references keep pointing at the same tensor.
        stored = self._stored_logical_weight()
        with torch.no_grad():
            if is_sharded(stored):  # FSDP2: this rank's shard of the whole new weight
                whole = full_tensor(stored).clone()
                whole[rows] = weight
                copy_into(stored, whole)
            else:
                stored[rows].copy_(weight)

    def _base_forward_with(
        self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        # The base layer's own forward on an (out, in) weight put in its storage layout (and optionally another
        # bias), so that the unchanged weight gives bit for bit what the base layer computes.
        tensors = {"weight": (weight.t() if self.fan_in_fan_out else weight).contiguous()}
        if bias is not None:
            tensors["bias"] = bias
        return torch.func.functional_call(self.get_base_layer(), tensors, (x,))


class LinearTuner(BaseTuner):
    """A BaseTuner of Linear/Conv1D layers: default targets per architecture, and injection that is all or nothing."""

    method = ""  # the method's name in error messages
    target_forms = "a list of names or a regex"  # what target_modules accepts, for error messages

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in self.target_module_mapping:
                raise ValueError(
                    f"{type(peft_config).__name__}.target_modules is None and {self.method} has no default targets "
                    f"for model_type={model_type!r} (defaults exist for {', '.join(sorted(self.target_module_mapping))}"
                    f"). Pass target_modules: {self.target_forms}. This model's Linear/Conv1D layers are "
                    f"named: {linear_layer_names(self.model)}."
                )
            peft_config.target_modules = set(self.target_module_mapping[model_type])
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """BaseTuner.inject_adapter, undone if it fails halfway, then `initialize_injected` once every target is in."""
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            in_place_modules(model, self.peft_config[adapter_name])  # bad names refused before anything is redrawn
        except NoMatchingPeftModuleError as error:
            raise NoMatchingPeftModuleError(
                f"{error} {self.method} wraps Linear and Conv1D layers; this model's are named: "
                f"{linear_layer_names(model)}."
            ) from error
        except Exception:
            _remove_adapter_layers(model, adapter_name, self.tuner_layer_cls)
            raise
        self.initialize_injected(model, adapter_name)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for adapter in self.active_adapters:
            config = self.peft_config.get(adapter)
            if config is not None and not config.inference_mode:
                for module in in_place_modules(model, config).values():
                    module.requires_grad_(True)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # Modules trained in place have no copy of their own: the adapter file carries their trained weights.
        for name, module in in_place_modules(model, config).items():
            for key, _ in module.named_parameters(prefix=name.replace("_fsdp_wrapped_module.", "")):
                to_return[key] = state_dict[key]
        raise_if_nonfinite(to_return.items(), "to save the adapter")
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        # PEFT only warns about missing keys, and a half-loaded adapter computes something else than what was saved.
        missing = sorted(cls._expected_adapter_keys(model, config, adapter_name) - remapped.keys())
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(
                f"The {cls.method} adapter {adapter_name!r} being loaded lacks {len(missing)} of the tensors this "
                f"model expects ({shown}): the file is incomplete or was altered, or it was saved from another "
                "model class (e.g. AutoModelForCausalLM, loaded here into AutoModel) or configuration. Nothing was "
                "loaded."
            )
        return remapped

    @classmethod
    def _expected_adapter_keys(cls, model: nn.Module, config, adapter_name: str) -> set[str]:
        """The state-dict keys a saved adapter of this tuner must hold for `model`: the own tensors of the layers
        that hold it (not another adapter's entries), and the modules it trains in place."""
        keys = set()
        for name, layer in model.named_modules():
            if isinstance(layer, BaseTunerLayer) and adapter_name in layer._all_available_adapter_names():
                others = set(layer._all_available_adapter_names()) - {adapter_name}
                path = name.replace("_fsdp_wrapped_module.", "")
                keys.update(
                    f"{path}.{key}"
                    for key in layer.state_dict()
                    if not key.startswith("base_layer.") and not others & set(key.split("."))
                )
        for name, module in in_place_modules(model, config).items():
            keys.update(key for key, _ in module.named_parameters(prefix=name.replace("_fsdp_wrapped_module.", "")))
        return keys

    def _unload_and_optionally_merge(self, merge: bool = True, *args, **kwargs):
        if merge:  # checked for every layer first, so that a broken adapter leaves the whole model as it was
            tensors = [
                (f"{name}.{key}", tensor)
                for name, layer in self.model.named_modules()
                if isinstance(layer, BaseTunerLayer)
                for key, tensor in layer.state_dict().items()
            ]
            raise_if_nonfinite(tensors, "to merge")
        return super()._unload_and_optionally_merge(merge, *args, **kwargs)

    def initialize_injected(self, model: nn.Module, adapter_name: str) -> None:
        """What a tuner does to the wrapped layers once all are wrapped (weights it redraws, say); nothing here."""

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        # Another adapter on an already wrapped layer, or a fresh wrap (inactive adapters start frozen, as in PEFT).
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config)
            return
        self.check_wrappable(target, current_key)
        new_module = self.tuner_layer_cls(target, adapter_name, peft_config, layer_key=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def check_wrappable(self, target: nn.Module, key: str) -> None:
        """Raise a clear TypeError unless `target` is a Linear or Conv1D layer, ValueError if its weight is tied."""
        if isinstance(target, BaseTunerLayer):
            raise TypeError(
                f"{self.method} cannot wrap {key}: it is already a {type(target).__module__}.{type(target).__name__} "
                f"layer of another PEFT method. Merge that one first (model = model.merge_and_unload()), then add "
                f"{self.method}."
            )
        if not isinstance(target, SUPPORTED_LAYERS):
            raise TypeError(
                f"{self.method} cannot wrap {key}: it is a {type(target).__name__}, and {self.method} wraps "
                f"torch.nn.Linear and transformers Conv1D layers only. This model's are named: "
                f"{linear_layer_names(self.model)}."
            )
        raise_if_tied(self.model, f"{key}.weight", target.weight, self.method)


def in_place_modules(model: nn.Module, config) -> dict[str, nn.Module]:
    """The modules `config.train_in_place` names (suffix match, like modules_to_save), checked to be trainable as is."""
    names = getattr(config, "train_in_place", None) or []
    owner = type(config).__name__
    overlap = sorted(set(names) & set(getattr(config, "modules_to_save", None) or []))
    if overlap:
        raise ValueError(
            f"{owner} names {', '.join(overlap)} in both train_in_place and modules_to_save; a module either trains "
            "in place (no copy) or as a saved copy beside the frozen original: keep it in one of them."
        )
    found: dict[str, nn.Module] = {}
    for wanted in names:
        matches = {
            name: module
            for name, module in model.named_modules()
            if (name == wanted or name.endswith("." + wanted)) and not isinstance(module, BaseTunerLayer)
        }
        if not matches:
            raise ValueError(
                f"{owner}.train_in_place names {wanted!r}, but no module of the model is called that (names match "
                f"a module's full name or its last parts, e.g. 'embed_tokens' or 'model.norm')."
            )
        for name, module in matches.items():
            if any(isinstance(inner, BaseTunerLayer) for inner in module.modules()):
                raise ValueError(
                    f"{owner}.train_in_place names {wanted!r}, and {name} holds layers the adapter wraps; training "
                    "it in place would train their frozen base weights too. Name modules outside the targets "
                    "(embeddings, norms, heads)."
                )
        found.update(matches)
    return found


def _remove_adapter_layers(model: nn.Module, adapter_name: str, layer_cls: type) -> None:
    for name, layer in [(name, m) for name, m in model.named_modules() if isinstance(m, layer_cls)]:
        adapters = set(layer._all_available_adapter_names())
        if adapters == {adapter_name}:
            parent, _, child_name = _get_submodules(model, name)
            setattr(parent, child_name, layer.get_base_layer())
        elif adapter_name in adapters:
            layer.delete_adapter(adapter_name)
