"""Release checkpoints and presets: round trip, hash verification, clear errors."""

import json
from pathlib import Path

import pytest
import torch

from codec import presets
from codec.checkpoint import load_model_dir, load_pretrained, save_model
from codec.errors import CheckpointError, UnknownModelError
from tests.conftest import tiny_codec


def test_round_trip_restores_identical_outputs(tmp_path):
    model = tiny_codec(seed=5)
    save_model(model, tmp_path, provenance={"steps": 0}, model_id="tiny", trained=False)
    loaded = load_pretrained(tmp_path)
    wav = torch.randn(1, 1, 3200)
    assert torch.equal(loaded.model.encode(wav), model.encode(wav))
    assert loaded.model_id == "tiny" and loaded.trained is False and len(loaded.sha256) == 64
    assert loaded.weights_hash == bytes.fromhex(loaded.sha256[:16])
    assert torch.equal(load_model_dir(tmp_path).encode(wav), model.encode(wav))  # the weights alone
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["latent_dim"] == 16 and config["n_stages"] == 4 and config["provenance"] == {"steps": 0}


def test_float16_storage_halves_the_file(tmp_path):
    model = tiny_codec()
    save_model(model, tmp_path / "a")
    save_model(model, tmp_path / "b", dtype=torch.float16)
    a, b = (tmp_path / "a/model.safetensors").stat().st_size, (tmp_path / "b/model.safetensors").stat().st_size
    assert b < 0.6 * a
    assert load_model_dir(tmp_path / "b").quantizer.stages[0].frozen_codebook.dtype == torch.float32


def test_float16_storage_keeps_what_float16_cannot_hold_in_float32(tmp_path):
    model = tiny_codec()
    with torch.no_grad():
        model.quantizer.stages[0].whitener.cov.mul_(1e5)  # a loud latent: covariances beyond 65504
    wav = torch.randn(1, 1, 3200)
    save_model(model, tmp_path, dtype=torch.float16)
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "model.safetensors")
    assert stored["quantizer.stages.0.whitener.cov"].dtype == torch.float32
    assert stored["quantizer.stages.1.whitener.cov"].dtype == torch.float16
    loaded = load_model_dir(tmp_path)
    assert torch.equal(loaded.quantizer.stages[0].whitener.cov, model.quantizer.stages[0].whitener.cov)
    assert loaded.encode(wav).shape == model.encode(wav).shape


def test_altered_weights_are_rejected(tmp_path):
    save_model(tiny_codec(), tmp_path)
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_model_dir(tmp_path)


def test_weights_of_another_model_are_rejected(tmp_path):
    save_model(tiny_codec(seed=1), tmp_path / "a")
    save_model(tiny_codec(seed=2), tmp_path / "b")
    (tmp_path / "a/model.safetensors").write_bytes((tmp_path / "b/model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="sha256"):
        load_model_dir(tmp_path / "a")


def test_missing_or_bad_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="format"):
        load_model_dir(tmp_path)


def test_a_config_saved_with_retired_options_loads_where_their_behaviour_remains(tmp_path):
    model = tiny_codec(seed=3, phase="propagated", rephase_iters=1)
    save_model(model, tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["model"].update(normalize_latent=False, normalize_codes=False, rephase_hears="played")
    path.write_text(json.dumps(config))
    codes = torch.randint(0, 64, (1, 4, 5))
    assert torch.equal(load_model_dir(tmp_path).decode(codes), model.decode(codes))
    for retired, message in (
        (dict(rephase_hears="own"), "rephase_hears='own' is gone"),
        (dict(normalize_codes=True), "normalize_codes=true"),
    ):
        path.write_text(json.dumps({**config, "model": {**config["model"], **retired}}))
        with pytest.raises(CheckpointError, match=message):
            load_model_dir(tmp_path)


def test_a_config_that_does_not_fit_its_weights_says_what_does_not_fit(tmp_path):
    save_model(tiny_codec(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["latent_dim"] = 24  # the hash covers the weights, not the arguments
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_model_dir(tmp_path)
    assert str(err.value) == (
        f"{tmp_path / 'model.safetensors'} does not fit the model that {tmp_path / 'config.json'} describes (size "
        "mismatch for encoder_out.1.weight: copying a param with shape torch.Size([16, 32]) from checkpoint, the "
        "shape in current model is torch.Size([24, 32]); and 14 more): the config or the weights were changed"
    )
    config["model"]["latent_dim"], config["model"]["n_stages"] = 16, 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r'\(Unexpected key\(s\) in state_dict: "quantizer.stages.2.frozen_codebo'
        r".{100,200}\.\.\.\): the config",
    ):
        load_model_dir(tmp_path)


def test_presets_resolve_ids_and_reject_unknown(tmp_path):
    assert presets.DEFAULT_MODEL_ID in presets.list_models()
    assert presets.model_dir(None) == presets.MODELS[presets.DEFAULT_MODEL_ID][0]
    assert presets.model_dir(tmp_path) == tmp_path
    with pytest.raises(UnknownModelError, match="simvq-16k"):
        presets.model_dir("no-such-model")


def test_bundled_default_model_loads_and_verifies():
    release = presets.load_model(warn=False)
    config = presets.describe()
    assert release.sha256 == config["sha256"] and release.model_id == presets.DEFAULT_MODEL_ID
    model = release.model
    assert model.sample_rate == 16000 and model.hop_length == 320
    assert model.codebook_sizes == (16384, 16384) + (1024,) * 10 and model.stage_bits == (14, 14) + (10,) * 10
    assert presets.load_model("simvq-16k-v3", warn=False).model.codebook_sizes == (8192, 8192) + (1024,) * 10


def test_the_first_release_is_installed_for_its_token_files():
    from codec.tokfile import read_tok

    header, _ = read_tok(Path(__file__).parent / "golden" / "simvq-16k-v1.tok")  # a file of the first format
    assert header.version == 1 and presets.model_for_tokens(header) == "simvq-16k-v1"
    assert presets.load_model("simvq-16k-v1", warn=False).model.codebook_sizes == (1024,) * 12
