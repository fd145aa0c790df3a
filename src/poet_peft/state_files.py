"""State dicts of training helpers as safetensors + JSON: checkpoints that never need pickle to be read.

Accelerate's `register_for_checkpointing` saves custom objects as pickles and reloads them with
`weights_only=False`, so a crafted checkpoint runs code on resume. `save_state(obj, folder, name)` writes
`obj.state_dict()` as `name.safetensors` (its tensors) and `name.json` (everything else, with each tensor's key),
and `load_state` reads them back into `obj.load_state_dict`; both files are data only.

Sharded checkpoints (`torch.distributed.checkpoint`, which Accelerate writes under FSDP2) keep their tensors in
files torch loads weights-only, but their `.metadata` is a plain pickle: `check_sharded_checkpoint` unpickles it
first with only DCP's metadata classes and torch's sizes, dtypes and layouts allowed, and refuses anything else.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
# What a torch.distributed.checkpoint `.metadata` names besides the classes of its metadata module.
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else: any other global stops it before it is looked up or called."""

    def find_class(self, module: str, name: str):
        """The class or function `module.name` if DCP metadata may name it; else UnpicklingError."""
        # Looking a name up in these two modules runs nothing; any other module is refused before it is imported.
        found = super().find_class(module, name) if module in ("torch", _DCP_METADATA_MODULE) else None
        allowed = (
            (module, name) in _DCP_METADATA_GLOBALS
            or (module == "torch" and isinstance(found, torch.dtype))
            or (module == _DCP_METADATA_MODULE and isinstance(found, type))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def check_sharded_checkpoint(folder: str | os.PathLike) -> None:
    """Raise ValueError unless every `.metadata` under folder holds only torch.distributed.checkpoint metadata."""
    for path in sorted(Path(folder).rglob(".metadata")):
        try:
            with path.open("rb") as file:
                _MetadataUnpickler(file).load()
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{path} is not torch.distributed.checkpoint metadata (it names {error}): refusing to load the "
                "checkpoint, whose pickle could run code when loaded."
            ) from None
        except Exception as error:  # truncated or foreign files fail in many ways inside pickle
            raise ValueError(f"{path} is not readable torch.distributed.checkpoint metadata: {error}") from None


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
