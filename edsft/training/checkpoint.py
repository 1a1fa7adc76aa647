"""Pickle-free training state: a nested state dict as one safetensors file plus one JSON file.

Optimizer, scheduler and ZeRO partition states are trees of dicts, lists and tuples whose leaves
are tensors and plain numbers. ``torch.save`` would pickle them, and unpickling a file runs
whatever code it names: anyone who can write to ``training.storage_path`` (often a shared bucket)
could then run code on every training node. Here the tensors go to ``<name>.safetensors`` (raw
bytes plus a JSON header) and the rest of the tree to ``<name>.json``, where a tensor is
``{"$tensor": key}``; loading either file executes nothing. A leaf that is neither a tensor nor a
JSON value is refused when saving, so a new kind of state cannot slip pickle back in.

Encoding: str-keyed dicts stay JSON objects (a key starting with ``$`` is escaped through the
``$items`` form), dicts with other keys (torch optimizers key their state by int) become
``{"$items": [[key, value], ...]}``, tuples (also named ones) ``{"$tuple": [...]}``, enums their value.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_state", "load_state", "state_files"]

_SCALARS = (str, int, float, bool, type(None))


def state_files(folder: Path, name: str) -> tuple[Path, Path]:
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def _encode(x: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(x, torch.Tensor):
        key = f"t{len(tensors)}"
        # a private contiguous CPU copy: safetensors refuses tensors that share memory
        tensors[key] = x.detach().to("cpu", copy=True).contiguous()
        return {"$tensor": key}
    if isinstance(x, enum.Enum):
        return _encode(x.value, tensors, path)
    if isinstance(x, _SCALARS):
        return x
    if isinstance(x, tuple):
        return {"$tuple": [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(x)]}
    if isinstance(x, list):
        return [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in x):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in x.items()}
        return {"$items": [[_encode(k, tensors, f"{path}<key>"), _encode(v, tensors, f"{path}[{k!r}]")] for k, v in x.items()]}
    raise TypeError(
        f"training state at {path or '<root>'} is a {type(x).__name__}: only tensors and JSON values are saved (no pickle)"
    )


def _decode(x: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(x, list):
        return [_decode(v, tensors) for v in x]
    if not isinstance(x, dict):
        return x
    if "$tensor" in x:
        return tensors[x["$tensor"]]
    if "$tuple" in x:
        return tuple(_decode(v, tensors) for v in x["$tuple"])
    if "$items" in x:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in x["$items"]}
    return {k: _decode(v, tensors) for k, v in x.items()}


def save_state(folder: Path, name: str, tree: Any) -> None:
    """Write ``tree`` as ``folder/<name>.safetensors`` + ``folder/<name>.json``."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors, "")
    st, js = state_files(folder, name)
    save_file(tensors, str(st))
    js.write_text(json.dumps(skeleton))


def load_state(folder: Path, name: str, device: str | torch.device = "cpu") -> Any:
    """The tree :func:`save_state` wrote, tensors on ``device``."""
    st, js = state_files(folder, name)
    if not (st.exists() and js.exists()):
        raise FileNotFoundError(f"checkpoint {folder} lacks {st.name} / {js.name}")
    return _decode(json.loads(js.read_text()), load_file(str(st), device=str(device)))
