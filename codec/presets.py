"""Named models: one table that the API, the CLI, the server and the decoder all resolve.

A token file names the model that made it by its weights hash; decoding looks that hash up among the models
here (`model_for_tokens`), so a file can only be decoded by a model this installation has, or one the user
gives with `--model ID|DIR`. A file never chooses a folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from codec.checkpoint import load_pretrained, read_config
from codec.errors import UnknownModelError
from codec.pretrained import Pretrained
from codec.tokfile import TokHeader

MODELS_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL_ID = "simvq-16k"

# id -> (directory, one-line description)
MODELS: dict[str, tuple[Path, str]] = {
    "simvq-16k": (
        MODELS_DIR / "simvq-16k",
        "16 kHz speech, 50 frames/s, SimVQ stages of 2 x 16384 then 10 x 1024 codes, 1.4-6.4 kbit/s",
    ),
    "simvq-16k-v4": (
        MODELS_DIR / "simvq-16k-v4",
        "the fourth release (the same shape, 3,000 steps less training), kept so that its token files decode",
    ),
    "simvq-16k-v3": (
        MODELS_DIR / "simvq-16k-v3",
        "the third release (2 x 8192 then 10 x 1024 codes, 1.3-6.3 kbit/s), kept so that its token files decode",
    ),
    "simvq-16k-v2": (
        MODELS_DIR / "simvq-16k-v2",
        "the second release (the third's shape, its recipe's first 3,000 steps), kept so that its token files decode",
    ),
    "simvq-16k-v1": (
        MODELS_DIR / "simvq-16k-v1",
        "the first release (12 x 1024-code stages, 0.5-6 kbit/s), kept so that its token files decode",
    ),
}


def list_models() -> list[str]:
    return sorted(MODELS)


def model_dir(model: str | os.PathLike | None = None) -> Path:
    """The directory of a preset id or an explicit model directory."""
    model = DEFAULT_MODEL_ID if model is None else model
    if str(model) in MODELS:
        return MODELS[str(model)][0]
    path = Path(model)
    if path.is_dir():
        return path
    raise UnknownModelError(
        f"unknown model {str(model)!r}: this installation has {', '.join(list_models())} (or pass a model directory)"
    )


def model_for_tokens(header: TokHeader) -> str:
    """The installed model whose weights made the codes of `header` (the file names them by a prefix of the
    weights' sha256; a model id a version-1 file carries is never used to find a model).

    Raises UnknownModelError when no installed model (or more than one) has those weights, saying that
    `--model` decodes the file with a model the user chooses.
    """
    found = [m for m in list_models() if header.made_with(describe(m)["sha256"])]
    if len(found) == 1:
        return found[0]
    named = "" if header.model_id is None else f" (model {header.model_id!r} in the file)"
    installed = ", ".join(f"{m} (weights {describe(m)['sha256'][:8]})" for m in list_models())
    why = "which this installation does not have" if not found else f"which match several models ({', '.join(found)})"
    raise UnknownModelError(
        f"the file was made with weights {header.weights_hash.hex()}{named}, {why} (installed: "
        f"{installed}); pass --model ID|DIR to decode it with a model you choose"
    )


def describe(model: str | os.PathLike | None = None) -> dict:
    """The config of a model without loading its weights (for `GET /v1/models` and `info`)."""
    return read_config(model_dir(model))


def load_model(
    model: str | os.PathLike | None = None, device: str | torch.device = "cpu", warn: bool = True
) -> Pretrained:
    """Load a preset id (default `simvq-16k`) or a model directory, verifying its hash: the model with its
    identity (`Pretrained`: `.model`, `.model_id`, `.sha256`, `.trained`).

    With `warn`, an untrained stand-in model says so on stderr: its output is not speech.
    """
    codec = load_pretrained(model_dir(model), device)
    if warn and not codec.trained:
        print(
            f"warning: model {codec.model_id!r} is UNTRAINED (random weights): its output is noise, not speech",
            file=sys.stderr,
        )
    return codec


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
