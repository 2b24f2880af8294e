"""Trainer checkpoints: atomic writes, the last K kept plus `latest`, loading without unpickling code."""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codec.errors import CheckpointError
from training.portable import PORTABLE, load_portable
from training.state_format import FORMAT, atomic_write

LATEST = "latest"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def save_checkpoint(state: dict[str, Any], ckpt_dir: Path, step: int, keep_last: int) -> Path:
    """Write `state` as `ckpt_dir/step_XXXXXXXX.pt` atomically, point `latest` at it, keep the last `keep_last`.

    A crash (even `kill -9`) at any moment leaves the previous checkpoint and `latest` intact: each file is
    written under a temporary name, fsynced, then renamed over the final name."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / checkpoint_name(step)
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))
    atomic_write(ckpt_dir / LATEST, lambda f: f.write(f"{path.name}\n".encode()))
    for old in list_checkpoints(ckpt_dir)[:-keep_last]:
        if old != path:
            old.unlink(missing_ok=True)
    for tmp in ckpt_dir.glob(".*.tmp-*"):  # left behind by a process killed while writing
        if not tmp.name.endswith(f".tmp-{os.getpid()}"):
            tmp.unlink(missing_ok=True)
    return path


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint files in `ckpt_dir`, oldest step first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint `latest` names, else the highest step present, else None."""
    marker = ckpt_dir / LATEST
    if marker.is_file():
        named = ckpt_dir / marker.read_text().strip()
        if _NAME.match(named.name) and named.is_file():
            return named
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the latest one of a run directory or its `checkpoints/` folder, or the portable
    checkpoint (`training.portable`) of a `training.bundle_run` output folder."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in (path / "checkpoints", path):
        if folder.is_dir() and (found := latest_checkpoint(folder)):
            return found
    if (path / PORTABLE).is_file():
        return path / PORTABLE
    raise CheckpointError(f"no training checkpoint at {path}")


def resolve_init(ref: str | Path) -> Path:
    """What `init_from` names: a training checkpoint (file or run directory, as `resolve_checkpoint`), or a
    released model (an installed id such as `simvq-16k`, or a directory with `config.json`), returned as
    its directory."""
    from codec.presets import MODELS

    if str(ref) in MODELS:
        return MODELS[str(ref)][0]
    path = Path(ref)
    if (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
        return path
    if not path.exists():
        raise CheckpointError(
            f"init_from {str(ref)!r} is neither an installed model id ({', '.join(sorted(MODELS))}) "
            "nor a checkpoint, run directory or model directory"
        )
    return resolve_checkpoint(path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a trainer checkpoint with `weights_only=True`: tensors and plain containers, never code.

    A `.json` path is a portable checkpoint (`training.portable`), loaded onto the CPU."""
    if Path(path).suffix == ".json":
        return load_portable(Path(path))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load training checkpoint {path}: {first}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} training checkpoint")
    return state


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA random states as tensors and plain values (safe for weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
