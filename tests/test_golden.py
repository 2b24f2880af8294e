"""The installed models, pinned: each one's weights hash and the tokens it gives a committed recording.

An accidental change to the weights, the quantizer search, the streaming encoder or the token file shows up
here as a different hash or different tokens. After a deliberate change (a new export of the default model),
regenerate the default model's golden file with `make golden` and commit it with the model.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path


import pytest

from codec import DEFAULT_MODEL_ID, compress, load_model
from codec.checkpoint import sha256_file
from codec.presets import list_models, model_dir
from codec.tokfile import read_tok
from tests.support import assert_same_tokens

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "examples" / "reference.wav"
GOLDEN_DIR = ROOT / "tests" / "golden"
PINNED = sorted(p.stem for p in GOLDEN_DIR.glob("*.tok"))
"""Every installed model, each with the tokens it gave the reference recording when it shipped (a model kept
for its old token files keeps its golden file, in the format of its day)."""


def encode_reference(model) -> bytes:
    out = io.BytesIO()
    compress(REFERENCE, out, model)
    return out.getvalue()


def test_every_installed_model_is_pinned():
    assert PINNED == list_models()


@pytest.mark.parametrize("model_id", PINNED)
def test_the_shipped_weights_are_the_pinned_ones(model_id):
    info = json.loads((GOLDEN_DIR / f"{model_id}.json").read_text())
    weights = model_dir(model_id) / "model.safetensors"
    config = json.loads((weights.parent / "config.json").read_text())
    assert sha256_file(weights) == config["sha256"], "model.safetensors does not match its config.json"
    assert config["sha256"] == info["model_sha256"], (
        f"{model_id} changed since its golden tokens were made: if that was meant, run `make golden`"
    )


@pytest.mark.parametrize("model_id", PINNED)
def test_the_reference_recording_gives_the_golden_tokens(model_id):
    model = load_model(model_id, warn=False)
    golden_file = GOLDEN_DIR / f"{model_id}.tok"
    header, codes = read_tok(io.BytesIO(encode_reference(model)))
    golden_header, golden = read_tok(golden_file)  # in the format version of its day
    header, golden_header = model.check(header), model.check(golden_header)  # the same weights made both
    fields = ("sample_rate", "hop_length", "n_stages", "stage_bits", "num_samples", "num_frames")
    assert [getattr(header, f) for f in fields] == [getattr(golden_header, f) for f in fields]
    frames = json.loads(golden_file.with_suffix(".json").read_text())["frames"]
    assert codes.shape == golden.shape == (model.model.n_stages, frames)
    assert_same_tokens(codes, golden, f"{golden_file.name}: the model or its code path changed")


def update() -> None:
    """Rewrite the golden token file and its record from the current default model."""
    model = load_model(DEFAULT_MODEL_ID, warn=False)
    data = encode_reference(model)
    golden = GOLDEN_DIR / f"{DEFAULT_MODEL_ID}.tok"
    golden.write_bytes(data)
    header, codes = read_tok(io.BytesIO(data))
    golden.with_suffix(".json").write_text(
        json.dumps(
            {
                "model_id": DEFAULT_MODEL_ID,
                "model_sha256": model.sha256,
                "reference": "examples/reference.wav",
                "stages": int(codes.shape[0]),
                "frames": int(codes.shape[1]),
                "tok_bytes": len(data),
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {golden} ({len(data)} bytes, {codes.shape[1]} frames x {codes.shape[0]} stages)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python -m tests.test_golden --update   (after a deliberate change of the default model)")
    update()
