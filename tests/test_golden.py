"""The shipped model, pinned: its weights hash and the tokens it gives a committed recording.

An accidental change to the weights, the quantizer search, the streaming encoder or the token file shows up
here as a different hash or different tokens. After a deliberate change (a new export of the default model),
regenerate the golden file with `make golden` and commit it with the model.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path


from codec import DEFAULT_MODEL_ID, compress, load_model
from codec.checkpoint import sha256_file
from codec.presets import model_dir
from codec.tokfile import read_tok
from tests.support import assert_same_tokens

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "examples" / "reference.wav"
GOLDEN = ROOT / "tests" / "golden" / f"{DEFAULT_MODEL_ID}.tok"
GOLDEN_INFO = GOLDEN.with_suffix(".json")


def encode_reference(model) -> bytes:
    out = io.BytesIO()
    compress(REFERENCE, out, model)
    return out.getvalue()


def test_the_shipped_weights_are_the_pinned_ones():
    info = json.loads(GOLDEN_INFO.read_text())
    weights = model_dir(DEFAULT_MODEL_ID) / "model.safetensors"
    config = json.loads((weights.parent / "config.json").read_text())
    assert sha256_file(weights) == config["sha256"], "model.safetensors does not match its config.json"
    assert config["sha256"] == info["model_sha256"], (
        "the default model changed since the golden tokens were made: if that was meant, run `make golden`"
    )


def test_the_reference_recording_gives_the_golden_tokens():
    model = load_model(DEFAULT_MODEL_ID, warn=False)
    header, codes = read_tok(io.BytesIO(encode_reference(model)))
    golden_header, golden = read_tok(GOLDEN)  # the format version it was written in (1 before version 2 existed)
    header, golden_header = model.check(header), model.check(golden_header)  # the same weights made both
    fields = ("model_id", "sample_rate", "hop_length", "n_stages", "stage_bits", "num_samples", "num_frames")
    assert [getattr(header, f) for f in fields] == [getattr(golden_header, f) for f in fields]
    assert codes.shape == golden.shape == (model.model.n_stages, json.loads(GOLDEN_INFO.read_text())["frames"])
    assert_same_tokens(codes, golden, f"{GOLDEN.name}: the model or its code path changed")


def update() -> None:
    """Rewrite the golden token file and its record from the current default model."""
    model = load_model(DEFAULT_MODEL_ID, warn=False)
    data = encode_reference(model)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_bytes(data)
    header, codes = read_tok(io.BytesIO(data))
    GOLDEN_INFO.write_text(
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
    print(f"wrote {GOLDEN} ({len(data)} bytes, {codes.shape[1]} frames x {codes.shape[0]} stages)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python -m tests.test_golden --update   (after a deliberate change of the default model)")
    update()
