"""Export a training checkpoint's generator (EMA or live weights) as a release directory (codec.checkpoint format)."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import torch

from codec.checkpoint import save_model
from codec.errors import CheckpointError
from codec.model import SimVQCodec, upgrade_config
from training.checkpoints import load_checkpoint, resolve_checkpoint


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    model_id: str = "simvq-16k",
    dtype: torch.dtype = torch.float32,
    weights: str = "ema",
) -> Path:
    """Write `out_dir/model.safetensors` + `config.json` from the EMA (or, `weights="live"`, the optimiser's
    current) weights of `checkpoint`. Right after a run changes course (a new loss, a warm start), the EMA
    averages weights from before and after that do not belong together, for about 1 / (1 - decay) steps.

    `checkpoint` is a checkpoint file, a run directory or its `checkpoints/` folder (the latest is used).
    Provenance records the steps, the corpus, the full training config, the checkpoint and the date."""
    if weights not in ("ema", "live"):
        raise ValueError(f"weights must be 'ema' or 'live', got {weights!r}")
    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path)
    config = state["config"]
    try:
        model = SimVQCodec(**upgrade_config(state.get("model_config", config["model"])))
        model.load_state_dict(state["ema"]["model"] if weights == "ema" else state["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not match this version's SimVQCodec: {str(e).splitlines()[0]}") from None
    provenance = {
        "steps": int(state["step"]),
        "weights": weights,
        "ema_updates": int(state["ema"]["updates"]),
        "ema_decay": config["ema_decay"],
        "skipped_steps": state["skipped"],
        "training_minutes": round(float(state["elapsed"]) / 60, 1),
        "corpus": state["corpus"],
        "config": config,
        "checkpoint": path.name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return save_model(model.eval(), out_dir, provenance, model_id=model_id, dtype=dtype)
