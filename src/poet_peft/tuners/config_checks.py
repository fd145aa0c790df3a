"""Type checks the three tuners' configs share, so that a wrong type gets a message instead of a bare TypeError."""

from __future__ import annotations

import numbers


def normalize_module_names(config) -> None:
    """Check target_modules and exclude_modules (None, a regex string, or names) and store name lists as sets."""
    owner = type(config).__name__
    for field in ("target_modules", "exclude_modules"):
        value = getattr(config, field)
        if isinstance(value, (list, tuple, set)) and all(isinstance(name, str) for name in value):
            setattr(config, field, set(value))
        elif value is not None and not isinstance(value, str):
            raise TypeError(
                f"{owner}.{field}={value!r} is invalid: use None, a regex string, or a list of module names "
                "(strings), e.g. ['q_proj', 'v_proj']."
            )


def check_bool(config, field: str) -> None:
    """Raise TypeError unless the field is True or False (a string such as 'no' would otherwise count as True)."""
    value = getattr(config, field)
    if not isinstance(value, bool):
        raise TypeError(f"{type(config).__name__}.{field}={value!r} must be True or False.")


def check_number(config, field: str) -> None:
    """Raise TypeError unless the field is a real number (not a bool or a string such as '8')."""
    value = getattr(config, field)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{type(config).__name__}.{field}={value!r} must be a number, e.g. 8.0.")
