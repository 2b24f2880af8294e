"""A trainer checkpoint in a few safetensors files of bounded size, for machines that return only small files.

`training.bundle_run` writes one into its output folder beside the exported model, and `simvq-codec train`
continues from it (`init_from=OUT` or `init_from=OUT/checkpoint.json`), as from a `.pt` checkpoint:

    OUT/checkpoint.json                           the state's structure and every non-tensor value (JSON),
                                                  the shards' names and sha256, and the commit point
    OUT/checkpoint-00001234-0.safetensors, ...    the tensors, each file at most `max_file_bytes`
    OUT/model/model.safetensors                   the EMA weights, when `ema_dir` names that export

Two things make it smaller than the `.pt` file (about half for the default model) and are not bit-exact:
the optimisers' moment estimates (`exp_avg`, `exp_avg_sq`) are stored in bfloat16 (8 significant bits; they
are running averages of noisy gradients), and the EMA weights can be the exported model's (float16), so
they are not stored twice. The trained weights, the discriminators, the step, the data position and the
random states are exact. Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from codec.checkpoint import sha256_file
from codec.errors import CheckpointError
from training.state_format import FORMAT, atomic_write

PORTABLE = "checkpoint.json"
PORTABLE_FORMAT = "simvq-codec-train-portable/1"
MAX_FILE_BYTES = 16 * 2**20
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_SHARD = re.compile(r"^checkpoint-\d{8,}-\d+\.safetensors$")
_HEADER_ROOM = 2**20  # safetensors' JSON header (tensor names and offsets) lives in the same file


def save_portable(
    state: dict[str, Any], out_dir: Path, ema_dir: Path | None = None, max_file_bytes: int = MAX_FILE_BYTES
) -> Path:
    """Write a trainer `state` (as `Trainer.state_dict()`) into `out_dir`; returns `out_dir/checkpoint.json`.

    Args:
        state: the trainer's state; its tensors may be on any device.
        out_dir: the folder; the shards of the previous portable checkpoint there are deleted once this one
            is complete (until then a kill leaves the previous one whole).
        ema_dir: a release directory exported from this same state (`training.export`): its weights stand
            for `state["ema"]["model"]` instead of a second copy.
        max_file_bytes: the largest shard.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    ema_file = ema_dir / "model.safetensors" if ema_dir else None
    ema_keys = _keys(ema_file) if ema_file else set()

    def encode(value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, torch.Tensor):
            name = "/".join(path)
            if path[:2] == ("ema", "model") and path[2] in ema_keys:
                return {"__tensor__": path[2], "dtype": str(value.dtype), "file": "ema"}
            moment = path[0].endswith("_opt") and path[-1] in _MOMENTS and value.is_floating_point()
            tensors[name] = value.detach().to("cpu", torch.bfloat16 if moment else value.dtype, copy=True)
            return {"__tensor__": name, "dtype": str(value.dtype)}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value):
                return {k: encode(v, (*path, k)) for k, v in value.items()}
            return {"__items__": [[k, encode(v, (*path, str(k)))] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v, (*path, str(i))) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, (*path, str(i))) for i, v in enumerate(value)]
        return value

    skeleton = encode(state, ())
    missing = {k for k in state["ema"]["model"]} - ema_keys if ema_file else set()
    if ema_file and missing:
        raise CheckpointError(f"{ema_file} lacks the EMA tensors {sorted(missing)[:3]}: not this state's export")

    step = int(state["step"])
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > max_file_bytes - _HEADER_ROOM:
            raise CheckpointError(f"tensor {name} ({nbytes} bytes) does not fit a {max_file_bytes}-byte file")
        if size + nbytes > max_file_bytes - _HEADER_ROOM:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    files = []
    for i, shard in enumerate(shards):
        name = f"checkpoint-{step:08d}-{i}.safetensors"
        data = safetensors_bytes(shard)
        atomic_write(out_dir / name, lambda f, data=data: f.write(data))
        files.append({"name": name, "sha256": hashlib.sha256(data).hexdigest()})
    index = {
        "format": PORTABLE_FORMAT,
        "step": step,
        "files": files,
        "ema_weights": {"name": ema_file.relative_to(out_dir).as_posix(), "sha256": sha256_file(ema_file)}
        if ema_file
        else None,
        "state": skeleton,
    }
    path = out_dir / PORTABLE
    atomic_write(path, lambda f: f.write(json.dumps(index).encode()))
    kept = {f["name"] for f in files}
    for old in out_dir.iterdir():
        if _SHARD.match(old.name) and old.name not in kept:
            old.unlink(missing_ok=True)
    return path


def load_portable(path: Path) -> dict[str, Any]:
    """The trainer state that `save_portable` wrote, as `training.checkpoints.load_checkpoint` returns it."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read portable checkpoint {path}: {e}") from None
    if not isinstance(index, dict) or index.get("format") != PORTABLE_FORMAT:
        raise CheckpointError(f"{path} is not a {PORTABLE_FORMAT} checkpoint")
    folder = path.parent
    tensors: dict[str, torch.Tensor] = {}
    for entry in index["files"]:
        file = folder / entry["name"]
        if not file.is_file() or sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"{file} is missing or altered: the portable checkpoint {path} is incomplete")
        tensors.update(_read(file))
    ema: dict[str, torch.Tensor] = {}
    if index.get("ema_weights"):
        file = folder / index["ema_weights"]["name"]
        if not file.is_file():
            raise CheckpointError(f"{path} takes its EMA weights from {file}, which is missing")
        if sha256_file(file) != index["ema_weights"]["sha256"]:
            warnings.warn(f"{file} was written by a later save than {path}: its EMA weights are a little newer")
        ema = _read(file)

    def decode(value: Any) -> Any:
        if isinstance(value, dict):
            if "__tensor__" in value:
                source = ema if value.get("file") == "ema" else tensors
                return source[value["__tensor__"]].to(getattr(torch, value["dtype"].removeprefix("torch.")))
            if "__items__" in value:
                return {k: decode(v) for k, v in value["__items__"]}
            if "__tuple__" in value:
                return tuple(decode(v) for v in value["__tuple__"])
            return {k: decode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    try:
        state = decode(index["state"])
    except KeyError as e:
        raise CheckpointError(f"{path} names a tensor its files lack: {e}") from None
    state["format"] = FORMAT
    return state


def _read(file: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read {file}: {str(e).splitlines()[0]}") from None


def _keys(file: Path) -> set[str]:
    with safe_open(str(file), framework="pt") as f:
        return set(f.keys())
