"""State dicts of training helpers as safetensors + JSON: checkpoints that never need pickle to be read.

Accelerate's `register_for_checkpointing` saves custom objects as pickles and reloads them with
`weights_only=False`, so a crafted checkpoint runs code on resume. `save_state(obj, folder, name)` writes
`obj.state_dict()` as `name.safetensors` (its tensors) and `name.json` (everything else, with each tensor's key),
and `load_state` reads them back into `obj.load_state_dict`; both files are data only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_state(obj, folder: str | os.PathLike, name: str) -> None:
    """Write obj.state_dict() (tensors, numbers, strings, None, and lists and str-keyed dicts of them) to folder."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(obj.state_dict(), tensors, name)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(structure))


def load_state(obj, folder: str | os.PathLike, name: str) -> None:
    """Restore obj from the files save_state(obj, folder, name) wrote; clear errors if missing or malformed."""
    folder = Path(folder)
    paths = [folder / f"{name}.json", folder / f"{name}.safetensors"]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} holds no saved {name} state ({', '.join(missing)} missing): the checkpoint was written "
            f"without it. Resume with the same options the checkpoint was written with."
        )
    try:
        structure = json.loads(paths[0].read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{paths[0]} is not valid JSON ({error}): the checkpoint is damaged.") from error
    obj.load_state_dict(_decode(structure, load_file(str(paths[1])), paths[0]))


def _encode(value, tensors: dict[str, torch.Tensor], path: str):
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous().clone()  # clones: safetensors refuses shared storage
        return {"tensor": path}
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"save_state: {path} has keys that are not strings; only str-keyed dicts can be saved.")
        return {"dict": {key: _encode(item, tensors, f"{path}/{key}") for key, item in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"list": [_encode(item, tensors, f"{path}/{index}") for index, item in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"save_state: {path} is a {type(value).__name__}, which cannot be saved without pickle.")


def _decode(node, tensors: dict[str, torch.Tensor], source: Path):
    kind = next(iter(node), None) if isinstance(node, dict) and len(node) == 1 else None
    if kind == "tensor" and node["tensor"] in tensors:
        return tensors[node["tensor"]]
    if kind == "dict" and isinstance(node["dict"], dict):
        return {key: _decode(item, tensors, source) for key, item in node["dict"].items()}
    if kind == "list" and isinstance(node["list"], list):
        return [_decode(item, tensors, source) for item in node["list"]]
    if kind == "value" and (node["value"] is None or isinstance(node["value"], (bool, int, float, str))):
        return node["value"]
    raise ValueError(f"{source} holds an entry save_state never writes ({str(node)[:200]}): the checkpoint is damaged.")
