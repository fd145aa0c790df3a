"""Teach PEFT about poet-peft's tuner types, idempotently (a second import or a reload changes nothing)."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method


def add_peft_type(name: str) -> PeftType:
    """The PeftType member `name`, added to PEFT's closed enum if it is not there yet."""
    if name in PeftType.__members__:
        return PeftType[name]
    # PeftType has no extension API. Build the member as Enum does; name and value must agree so that the
    # string "POET" read from an adapter_config.json hashes and compares equal to the member.
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def register_tuner(name: str, config_cls: type, model_cls: type) -> None:
    """Register a tuner type with PEFT under `name` (lower case); registering again swaps in the given classes."""
    peft_type = add_peft_type(name.upper())
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    else:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls)
