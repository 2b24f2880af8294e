"""Self-describing release checkpoints: `model.safetensors` beside `config.json`, checked by sha256.

`config.json` holds the constructor arguments, the stream parameters a user needs without loading the
weights, the sha256 of the weights file, and provenance (how it was trained). Loading verifies the hash
before reading a single tensor, and nothing on this path unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from codec.errors import CheckpointError
from codec.model import SimVQCodec, upgrade_config
from codec.pretrained import Pretrained

FORMAT = "simvq-codec/1"
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 (and writers may recreate it): a release is for all to read
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in the storage `dtype`, or in float32 if casting would overflow values that were finite."""
    if not t.is_floating_point():
        return t
    cast = t.to(dtype)
    overflows = bool(torch.isfinite(t).all()) and not bool(torch.isfinite(cast).all())
    return t.float() if overflows else cast


def save_model(
    model: SimVQCodec,
    out_dir: str | os.PathLike,
    provenance: dict[str, Any] | None = None,
    model_id: str = "simvq-16k",
    trained: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a release directory that `load_pretrained` (and `--model DIR`) loads. Returns the directory.

    Args:
        model: the codec (for training runs, pass the EMA weights).
        out_dir: created if missing; existing files are replaced atomically.
        provenance: free-form facts (steps, corpus, date, git commit, ...).
        model_id: the id written into token files made with this model.
        trained: False for a randomly initialised stand-in; every tool then says so.
        dtype: storage precision of floating-point tensors (float16 halves the size); a tensor with values
            beyond that precision's range (a whitening covariance, say) stays float32.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: _stored(t, dtype).detach().cpu().contiguous() for name, t in model.state_dict().items()}
    _atomic_write(out / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    config = {
        "format": FORMAT,
        "model_id": model_id,
        "trained": trained,
        "sample_rate": model.sample_rate,
        "hop_length": model.hop_length,
        "frame_rate": model.frame_rate,
        "n_stages": model.n_stages,
        "codebook_size": model.config["codebook_size"],
        "bitrates_kbps": [round(model.bitrate(n) / 1000, 3) for n in range(1, model.n_stages + 1)],
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "sha256": sha256_file(out / WEIGHTS),
        "model": model.config,
        "provenance": provenance or {},
    }
    _atomic_write(out / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return out


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed `config.json` of a release directory (no weights loaded)."""
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{model_dir} is not a model directory: {CONFIG} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise CheckpointError(f"{path} is not a {FORMAT} config (format={found!r})")
    for key in ("sha256", "model", "model_id"):
        if key not in config:
            raise CheckpointError(f"{path} lacks the field {key!r}")
    return config


def load_pretrained(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Pretrained:
    """Load a release directory after verifying the weights' sha256: the model (in eval mode) with its id,
    hash and trained flag."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    weights = model_dir / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{model_dir} has no {WEIGHTS}")
    digest = sha256_file(weights)
    if digest != config["sha256"]:
        raise CheckpointError(
            f"{weights} does not match its config (sha256 {digest[:12]}..., expected {config['sha256'][:12]}...): "
            "the file was altered or belongs to another model"
        )
    try:
        model = SimVQCodec(**upgrade_config(config["model"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{model_dir / CONFIG} has model arguments this version does not take: {exc}") from None
    try:
        state = load_file(weights)
    except (RuntimeError, OSError) as exc:
        raise CheckpointError(f"cannot load {weights}: {exc}") from None
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as exc:
        raise CheckpointError(
            f"{weights} does not fit the model that {model_dir / CONFIG} describes "
            f"({_first_problems(exc)}): the config or the weights were changed"
        ) from None
    return Pretrained(model.to(device).eval(), config["model_id"], digest, bool(config.get("trained", False)))


def _first_problems(exc: RuntimeError, limit: int = 240) -> str:
    """The first of the problems `load_state_dict` lists (one a line, under a heading line), and how many more."""
    lines = [line.strip().rstrip(".") for line in str(exc).splitlines()[1:] if line.strip()] or [str(exc).strip()]
    first = lines[0] if len(lines[0]) <= limit else lines[0][: limit - 3] + "..."
    return first + (f"; and {len(lines) - 1} more" if len(lines) > 1 else "")


def load_model_dir(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> SimVQCodec:
    """The verified weights of a release directory alone (to start training from, say); `load_pretrained`
    also gives the identity that token files need."""
    return load_pretrained(model_dir, device).model
