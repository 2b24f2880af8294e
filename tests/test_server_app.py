"""Service behaviour at the app level (TestClient): endpoints, conversions, limits, errors, metrics."""

from __future__ import annotations

import dataclasses
import gc
import io
import os
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from fastapi.testclient import TestClient

from codec.api import compress, encode_array
from codec.audio import read_audio
from codec.errors import UnknownModelError
from codec.presets import load_model
from codec.tokfile import read_tok, write_tok
from server import Settings, create_app
from server.deps import get_model
from server.runtime import ServedModel
from tests.support import audio_bytes, gated, make_tiny_model, speech_like

torch.set_num_threads(1)
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("other"), model_id="tiny-other", seed=1)


def settings(**kw) -> Settings:
    base = dict(load_in_background=False, pool_size=1, models=["tiny-test"], warmup=False)
    return Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def client(tiny, other):
    app = create_app(settings(max_duration_s=20), models={"tiny-test": tiny, "tiny-other": other})
    with TestClient(app) as c:
        yield c


def assert_problem(r, status: int, reason: str, *words: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == status and body["type"].endswith(":" + reason), body
    assert body["title"] and body["detail"]
    for word in words:
        assert word in body["detail"], body["detail"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    return body


def wav(seconds=1.0, rate=16000, channels=1, subtype="PCM_16", fmt="WAV", seed=0) -> bytes:
    return audio_bytes(speech_like(seconds, rate, seed, channels), rate, fmt, subtype)


# --- settings ----------------------------------------------------------------------------------------
def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("SIMVQ_MAX_CONCURRENCY", "7")
    monkeypatch.setenv("SIMVQ_MODELS", "simvq-16k, /models/other")
    monkeypatch.setenv("SIMVQ_TORCH_THREADS", "2")
    s = Settings()
    assert s.max_concurrency == 7 and s.torch_threads == 2
    assert s.models == ["simvq-16k", "/models/other"] and s.default_model == "simvq-16k"
    monkeypatch.setenv("SIMVQ_MODELS", '["a", "b"]')
    assert Settings().models == ["a", "b"]
    monkeypatch.setenv("SIMVQ_MAX_CONCURRENCY", "0")
    with pytest.raises(ValueError, match="max_concurrency"):
        Settings()


def test_pool_size_follows_cpu_and_threads():
    assert Settings(pool_size=3).resolved_pool_size() == 3
    assert Settings(device="cuda:0").resolved_pool_size() == 1
    assert Settings().resolved_pool_size() == len(os.sched_getaffinity(0))  # one thread per core
    assert Settings(torch_threads=256).resolved_pool_size() == 1


# --- endpoints ---------------------------------------------------------------------------------------
def test_models_lists_served_models(client, tiny):
    models = {m["id"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"tiny-test", "tiny-other"}
    m = models["tiny-test"]
    assert m["default"] is True and m["trained"] is False and models["tiny-other"]["default"] is False
    assert (m["sample_rate"], m["hop_length"], m["frame_rate"], m["n_stages"]) == (16000, 320, 50.0, 4)
    assert m["bitrates_kbps"] == [0.3, 0.6, 0.9, 1.2]  # 6 bits x 50 frames/s per stage
    assert m["codebook_sizes"] == [64] * 4 and m["stage_bits"] == [6] * 4 and m["bits_per_code"] == 6
    assert m["weights_hash"] == tiny.sha256[:16]


def test_encode_tok_and_json_agree_and_decode_keeps_length(client, tiny):
    audio = speech_like(0.77, seed=3)  # 12320 samples: not a whole number of frames
    body = audio_bytes(audio, 16000)
    tok = client.post("/encode", content=body, headers={"content-type": "audio/wav"})
    assert tok.status_code == 200 and tok.headers["content-type"] == "application/octet-stream"
    header, codes = read_tok(io.BytesIO(tok.content))
    assert header.num_samples == 12320 and codes.shape == (4, 39) and header.made_with(tiny.sha256)
    assert header.version == 2 and len(tok.content) == 16 + 39 * 4 * 6 // 8 + 4
    js = client.post("/encode?format=json", content=body, headers={"content-type": "audio/wav"}).json()
    assert np.array_equal(np.array(js["codes"]), codes) and js["num_samples"] == 12320
    assert js["weights_hash"] == tiny.sha256[:16] and js["frame_rate"] == 50.0 and js["model_id"] == "tiny-test"
    assert js["bits_per_code"] == 6 and js["stage_bits"] == [6, 6, 6, 6]
    # the codes are what the library computes for the same 16-bit samples
    pcm16 = sf.read(io.BytesIO(body), dtype="float32")[0]
    assert np.array_equal(encode_array(pcm16, 16000, tiny)[1], codes)
    a = client.post("/decode", content=tok.content, headers={"content-type": "application/octet-stream"})
    b = client.post("/decode", json=js)
    assert a.status_code == b.status_code == 200 and a.headers["content-type"] == "audio/wav"
    assert a.content == b.content
    out, rate = sf.read(io.BytesIO(a.content), dtype="int16")
    assert rate == 16000 and out.shape == (12320,)
    flac = client.post("/decode?format=flac", content=tok.content, headers={"content-type": "application/octet-stream"})
    assert flac.headers["content-type"] == "audio/flac"
    assert np.array_equal(sf.read(io.BytesIO(flac.content), dtype="int16")[0], out)


def test_stages_and_bitrate_choose_the_stage_count(client):
    body = wav(0.3)
    for query, stages in (("stages=2", 2), ("bitrate=0.95", 3), ("bitrate=100", 4), ("", 4)):
        r = client.post(f"/encode?format=json&{query}", content=body, headers={"content-type": "audio/wav"})
        assert r.json()["n_stages"] == stages and len(r.json()["codes"]) == stages
        assert r.headers["x-stages"] == str(stages)


def test_other_rates_and_channels_are_converted_as_the_cli_does(client, tiny, tmp_path):
    body = wav(0.9, rate=44100, channels=2, subtype="PCM_24", fmt="FLAC", seed=4)
    r = client.post("/encode?format=json", content=body, headers={"content-type": "audio/flac"})
    assert r.status_code == 200, r.text
    src = tmp_path / "in.flac"
    src.write_bytes(body)
    compress(src, tmp_path / "cli.tok", model=tiny)
    cli_header, cli_codes = read_tok(tmp_path / "cli.tok")
    assert r.json()["num_samples"] == cli_header.num_samples == len(read_audio(src, 16000)[0])
    assert np.array_equal(np.array(r.json()["codes"]), cli_codes)


def test_multipart_upload_and_model_choice(client, other):
    body = wav(0.4, seed=5)
    r = client.post("/encode?model=tiny-other", files={"file": ("clip.wav", body, "audio/wav")})
    assert r.status_code == 200, r.text
    header, _ = read_tok(io.BytesIO(r.content))
    assert header.weights_hash.hex() == other.sha256[:8]
    # decode picks the model the file names
    out = client.post("/decode", content=r.content, headers={"content-type": "application/octet-stream"})
    assert out.status_code == 200
    r = client.post("/encode", files={"audio": ("clip.wav", body, "audio/wav")})
    assert_problem(r, 400, "invalid-multipart", "'file'")


def test_version_1_token_files_still_decode(client, tiny):
    h = {"content-type": "application/octet-stream"}
    tok = client.post("/encode", content=wav(0.5, seed=7), headers={"content-type": "audio/wav"}).content
    header, codes = read_tok(io.BytesIO(tok))
    old = io.BytesIO()
    write_tok(old, dataclasses.replace(tiny.header(header.n_stages, header.num_samples), version=1), codes)
    assert old.getvalue()[:5] == b"SVQT\x01" and len(old.getvalue()) == len(tok) + 43 + len("tiny-test") - 16
    a, b = client.post("/decode", content=tok, headers=h), client.post("/decode", content=old.getvalue(), headers=h)
    assert a.status_code == b.status_code == 200 and a.content == b.content


def test_ogg_vorbis_is_accepted(client):
    r = client.post(
        "/encode?format=json",
        content=wav(0.5, 22050, fmt="OGG", subtype="VORBIS"),
        headers={"content-type": "audio/ogg"},
    )
    assert r.status_code == 200 and r.json()["num_samples"] == 8000


# --- input limits and errors ---------------------------------------------------------------------------
def test_content_type_and_container_allowlists(client):
    assert_problem(
        client.post("/encode", content=b"abc", headers={"content-type": "text/plain"}),
        415,
        "unsupported-media-type",
        "audio/wav",
    )
    aiff = wav(0.2, fmt="AIFF")
    assert_problem(
        client.post("/encode", content=aiff, headers={"content-type": "audio/wav"}),
        415,
        "unsupported-container",
        "AIFF",
    )
    assert_problem(
        client.post("/encode", content=wav(0.2, fmt="FLAC"), headers={"content-type": "audio/wav"}),
        415,
        "content-type-mismatch",
        "audio/flac",
    )
    assert_problem(
        client.post("/encode", content=wav(0.2, subtype="ULAW"), headers={"content-type": "audio/wav"}),
        415,
        "unsupported-sample-format",
        "ULAW",
    )
    assert_problem(
        client.post("/encode", content=b"RIFF0000WAVEjunk", headers={"content-type": "audio/wav"}),
        422,
        "invalid-audio",
        "not a readable",
    )
    assert_problem(
        client.post("/encode", content=b"", headers={"content-type": "audio/wav"}), 422, "invalid-audio", "empty"
    )
    assert_problem(
        client.post("/decode", content=b"abc", headers={"content-type": "audio/wav"}),
        415,
        "unsupported-media-type",
        "application/octet-stream",
    )


def test_rate_channels_and_duration_bounds(client):
    assert_problem(
        client.post("/encode", content=wav(0.2, rate=2000), headers={"content-type": "audio/wav"}),
        422,
        "invalid-sample-rate",
        "2000 Hz",
    )
    nine = audio_bytes(np.zeros((1600, 9), np.float32), 16000, "WAV", "PCM_16")
    assert_problem(
        client.post("/encode", content=nine, headers={"content-type": "audio/wav"}),
        422,
        "invalid-channels",
        "9 channels",
    )
    # 21 s of 8 kHz 8-bit is small (168 kB) but longer than max_duration_s=20: refused from the header
    long = audio_bytes(np.zeros(21 * 8000, np.float32), 8000, "WAV", "PCM_U8")
    body = assert_problem(
        client.post("/encode", content=long, headers={"content-type": "audio/wav"}), 413, "audio-too-long", "21.0 s"
    )
    assert body["limit_seconds"] == 20


def test_non_finite_samples_are_rejected(client):
    x = speech_like(0.3)
    x[1000] = np.nan
    r = client.post("/encode", content=audio_bytes(x, 16000, "WAV", "FLOAT"), headers={"content-type": "audio/wav"})
    body = assert_problem(r, 422, "invalid-audio", "non-finite")
    assert body["detail"] == "the input has a non-finite sample (NaN or infinity) at 0.062 s"


def test_truncated_wav_is_refused_as_the_cli_refuses_it(client):
    whole = wav(2.0)
    half = whole[: len(whole) // 2]  # the header still declares 32000 frames
    r = client.post("/encode", content=half, headers={"content-type": "audio/wav"})
    assert_problem(
        r,
        422,
        "invalid-audio",
        "the input is truncated: its header declares 32000 frames (2.00 s) but it holds 15989 (1.00 s)",
    )
    r = client.post("/encode", files={"file": ("half.wav", half, "audio/wav")})
    assert_problem(r, 422, "invalid-audio", "truncated")
    huge = whole[:40] + (2**32 - 2).to_bytes(4, "little") + whole[44:54]  # 2**31 frames declared, 10 bytes
    assert_problem(
        client.post("/encode", content=huge, headers={"content-type": "audio/wav"}),
        422,
        "invalid-audio",
        "declares 2147483647 frames",
    )


def test_parameter_errors_name_the_parameter(client):
    body = wav(0.2)
    h = {"content-type": "audio/wav"}
    p = assert_problem(client.post("/encode?stages=0", content=body, headers=h), 422, "invalid-parameter", "stages")
    assert p["errors"][0]["location"] == "query parameter 'stages'"
    assert_problem(
        client.post("/encode?stages=9", content=body, headers=h), 422, "invalid-parameter", "between 1 and 4"
    )
    assert_problem(
        client.post("/encode?stages=2&bitrate=1", content=body, headers=h), 422, "invalid-parameter", "not both"
    )
    assert_problem(client.post("/encode?bitrate=0.1", content=body, headers=h), 422, "invalid-parameter", "0.3")
    assert_problem(client.post("/encode?format=mp3", content=body, headers=h), 422, "invalid-parameter", "format")
    assert_problem(
        client.post("/encode?model=nope", content=body, headers=h), 422, "unknown-model", "tiny-test, tiny-other"
    )


def test_bitrate_follows_the_cli_rule_with_the_same_message(client, tiny):
    from codec.errors import CodecError
    from codec.stages import resolve_stages

    h = {"content-type": "audio/wav"}
    messages = {}
    for value in ("nan", "-1", "0", "0.1"):
        with pytest.raises(CodecError) as err:
            resolve_stages(tiny.model, bitrate=float(value))
        messages[value] = str(err.value)
        assert_problem(
            client.post(f"/encode?bitrate={value}", content=wav(0.2), headers=h),
            422,
            "invalid-parameter",
            messages[value],
        )
    assert messages["nan"] == "the bitrate must be a number of kbit/s above 0, got nan"
    assert messages["0.1"].startswith("0.1 kbit/s is below this model's lowest bitrate, 0.3 kbit/s")
    for value in ("1e9", "inf"):  # at or above the top rate: every stage, as on the command line
        r = client.post(f"/encode?bitrate={value}&format=json", content=wav(0.2), headers=h)
        assert r.status_code == 200 and r.json()["n_stages"] == tiny.model.n_stages, r.text


def test_malformed_multipart_detail_reads_as_one_sentence(client):
    r = client.post(
        "/encode", content=b"--x\r\nnot a part", headers={"content-type": "multipart/form-data; boundary=x"}
    )
    body = assert_problem(r, 400, "invalid-multipart", "send one file part named 'file'")
    assert ".;" not in body["detail"] and body["detail"][0].islower(), body["detail"]


def test_token_errors(client, tiny, other, tmp_path):
    h = {"content-type": "application/octet-stream"}
    assert_problem(client.post("/decode", content=b"not a token file", headers=h), 422, "invalid-token-file", "magic")
    tok = client.post("/encode", content=wav(0.3), headers={"content-type": "audio/wav"}).content
    assert_problem(client.post("/decode", content=tok[:-3], headers=h), 422, "invalid-token-file")
    js = client.post("/encode?format=json", content=wav(0.3), headers={"content-type": "audio/wav"}).json()
    bad = {**js, "codes": js["codes"][:2]}
    assert_problem(client.post("/decode", json=bad), 422, "invalid-token-file", "rows")
    bad = {**js, "codes": [[99] + row[1:] for row in js["codes"]]}
    assert_problem(client.post("/decode", json=bad), 422, "invalid-token-file", "[0, 64)")
    p = assert_problem(
        client.post("/decode", json={**js, "sample_rate": "x"}), 422, "invalid-token-json", "sample_rate"
    )
    assert p["errors"]
    # 25 s of tokens is over max_duration_s=20: refused from the header, before unpacking
    long = {**js, "num_samples": 25 * 16000, "num_frames": 25 * 50}
    assert_problem(client.post("/decode", json=long), 413, "audio-too-long", "25.0 s")
    foreign = {**js, "weights_hash": "00" * 8}
    assert_problem(
        client.post("/decode", json=foreign),
        422,
        "unknown-model",
        "weights 0000000000000000 (model 'tiny-test' in the tokens)",
        f"tiny-test (weights {tiny.sha256[:8]}), tiny-other",
    )
    # one message for every way a model does not fit the tokens (codec.Pretrained.check)
    assert_problem(
        client.post("/decode?model=tiny-other", json=js),
        422,
        "model-mismatch",
        f"do not fit model 'tiny-other': weights {tiny.sha256[:16]} (model: {other.sha256[:16]})",
    )
    assert_problem(
        client.post("/decode?model=tiny-other", content=tok, headers=h),
        422,
        "model-mismatch",
        f"weights {tiny.sha256[:8]} (model: {other.sha256[:8]})",
    )
    wider = {**js, "bits_per_code": None, "stage_bits": [7, 6, 6, 6]}
    assert_problem(client.post("/decode", json=wider), 422, "model-mismatch", "stage bits 7+6+6+6 (model: 6+6+6+6)")
    assert_problem(
        client.post("/decode", json={**js, "sample_rate": 8000}),
        422,
        "model-mismatch",
        "sample_rate 8000 (model: 16000)",
    )
    unknown = {**js, "model_id": "elsewhere", "weights_hash": "11" * 8}
    assert_problem(client.post("/decode", json=unknown), 422, "unknown-model", "elsewhere")
    contradiction = {**js, "stage_bits": [6, 6, 6, 5]}
    assert_problem(client.post("/decode", json=contradiction), 422, "invalid-token-json", "contradicts")
    neither = {k: v for k, v in js.items() if k not in ("stage_bits", "bits_per_code")}
    assert_problem(client.post("/decode", json=neither), 422, "invalid-token-json", "give stage_bits")


def test_token_json_codes_must_be_json_integers_in_range(client):
    js = client.post("/encode?format=json", content=wav(0.3), headers={"content-type": "audio/wav"}).json()
    for code, message in (
        (2**70, "less than 65536"),
        (-1, "greater than or equal to 0"),
        ("7", "valid integer"),
        (True, "valid integer"),
        (7.0, "valid integer"),
    ):
        bad = {**js, "codes": [[code] + row[1:] for row in js["codes"]]}
        body = assert_problem(client.post("/decode", json=bad), 422, "invalid-token-json", "codes.0.0", message)
        assert body["errors"][0]["location"] == "body field 'codes.0.0'", code
    assert_problem(client.post("/decode", json={**js, "num_samples": "4800"}), 422, "invalid-token-json", "num_samples")
    assert client.post("/decode", json=js).status_code == 200


def test_an_empty_stream_decodes_to_an_empty_wav_and_flac_refuses_it(client, tiny):
    js = client.post("/encode?format=json", content=wav(0.3), headers={"content-type": "audio/wav"}).json()
    empty = {**js, "num_samples": 0, "num_frames": 0, "codes": [[] for _ in js["codes"]]}
    r = client.post("/decode", json=empty)
    assert r.status_code == 200 and sf.info(io.BytesIO(r.content)).frames == 0
    assert_problem(
        client.post("/decode?format=flac", json=empty), 422, "invalid-audio", "FLAC cannot hold an empty stream"
    )


def test_body_limit_with_and_without_content_length(tiny):
    app = create_app(settings(max_body_bytes=4096), models={"tiny-test": tiny})
    body = wav(0.5)
    assert len(body) > 4096
    with TestClient(app) as c:
        r = c.post("/encode", content=body, headers={"content-type": "audio/wav"})
        assert assert_problem(r, 413, "body-too-large", "4096 bytes")["limit"] == 4096

        def chunks():
            for i in range(0, len(body), 1000):
                yield body[i : i + 1000]

        r = c.post("/encode", content=chunks(), headers={"content-type": "audio/wav"})
        assert "content-length" not in r.request.headers
        assert_problem(r, 413, "body-too-large")
        assert c.post("/encode", content=wav(0.05), headers={"content-type": "audio/wav"}).status_code == 200


def test_overload_answers_503_immediately_and_health_stays_up(tiny):
    app = create_app(settings(max_concurrency=2, retry_after_s=3), models={"tiny-test": tiny})
    with TestClient(app) as c:
        runtime = app.state.runtime
        assert runtime.slots.try_acquire() and runtime.slots.try_acquire()  # every slot busy
        t0 = time.perf_counter()
        r = c.post("/encode", content=wav(0.2), headers={"content-type": "audio/wav"})
        assert time.perf_counter() - t0 < 1.0
        assert_problem(r, 503, "overloaded", "2 work slots")
        assert r.headers["retry-after"] == "3"
        assert_problem(c.post("/decode", json={}), 503, "overloaded")
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert 'simvq_rejections_total{reason="overloaded"} 2.0' in c.get("/metrics").text
        runtime.slots.release()
        runtime.slots.release()
        assert c.post("/encode", content=wav(0.2), headers={"content-type": "audio/wav"}).status_code == 200


def test_deadline_answers_504_and_keeps_the_slot_until_the_work_ends(tiny):
    model = gated(tiny)
    app = create_app(settings(request_timeout_s=0.3), models={"tiny-test": model})
    with TestClient(app) as c:
        r = c.post("/encode", content=wav(0.2), headers={"content-type": "audio/wav"})
        assert_problem(r, 504, "deadline-exceeded", "0.3 s")
        assert app.state.runtime.slots.busy == 1  # the worker still runs the abandoned encode
        model.model.gate.set()
        for _ in range(100):
            if app.state.runtime.slots.busy == 0:
                break
            time.sleep(0.02)
        assert app.state.runtime.slots.busy == 0
        assert c.post("/encode", content=wav(0.2), headers={"content-type": "audio/wav"}).status_code == 200


def test_readiness_while_loading_then_ready(tiny):
    model = gated(tiny)
    frozen = gc.get_freeze_count()  # what earlier apps in this process froze
    app = create_app(settings(load_in_background=True, warmup=True), models={"tiny-test": model})
    with TestClient(app) as c:
        p = assert_problem(c.get("/readyz"), 503, "loading")
        assert p and c.get("/readyz").headers["retry-after"]
        assert c.get("/healthz").json() == {"status": "alive"}
        assert_problem(c.post("/encode", content=wav(0.1), headers={"content-type": "audio/wav"}), 503, "loading")
        assert "simvq_ready 0.0" in c.get("/metrics").text
        model.model.gate.set()  # lets the warm-up encode finish
        for _ in range(200):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.02)
        ready = c.get("/readyz").json()
        assert ready.pop("max_streams") >= 2  # measured during the warm-up
        assert ready == {"status": "ready", "models": ["tiny-test"]}
        assert "simvq_ready 1.0" in c.get("/metrics").text
        assert gc.get_freeze_count() > frozen  # what this app loaded is out of the collector's way


def test_failed_model_load_is_reported(monkeypatch):
    app = create_app(Settings(load_in_background=False, models=["no-such-model"], pool_size=1))
    with TestClient(app) as c:
        p = assert_problem(c.get("/healthz"), 503, "model-failed", "no-such-model")
        assert "Traceback" not in p["detail"]
        with pytest.raises(UnknownModelError) as err:
            load_model("no-such-model")
        assert p["detail"] == f"the model failed to load ({err.value}); fix the model settings and restart"
        assert_problem(c.get("/readyz"), 503, "model-failed")


class _Exploding:
    """A stand-in model whose encode fails with an internal message that must not leak."""

    sample_rate, hop_length, n_stages, bits_per_code, codebook_size, frame_rate = 16000, 320, 4, 6, 64, 50.0

    def bitrate(self, n=None):
        return (n or 4) * 300.0

    def parameters(self):
        return iter([torch.zeros(1)])

    def encode(self, *a, **k):
        raise RuntimeError("secret internal state /etc/passwd")


def test_internal_errors_are_problems_without_details_and_do_not_leak_into_the_next_request(tiny):
    app = create_app(settings(), models={"tiny-test": tiny})
    with TestClient(app, raise_server_exceptions=False) as client:
        exploding = dataclasses.replace(tiny, model=_Exploding())
        app.dependency_overrides[get_model] = lambda: ServedModel("tiny-test", exploding)
        r = client.post("/encode", content=wav(0.2), headers={"content-type": "audio/wav"})
        app.dependency_overrides.clear()
        assert_problem(r, 500, "internal-error", "logged")
        assert "secret" not in r.text and "passwd" not in r.text
        assert app.state.runtime.slots.busy == 0
        assert client.post("/encode", content=wav(0.2), headers={"content-type": "audio/wav"}).status_code == 200
        metrics = client.get("/metrics").text
        assert 'simvq_http_requests_total{method="POST",route="/encode",status="500"} 1.0' in metrics


class _RecordingBatcher:
    """A `ClipBatcher` that runs each clip alone and records what reached it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object, tuple[int, ...]]] = []

    def encode(self, model, wav, n_stages):
        self.calls.append(("encode", model, tuple(wav.shape)))
        return model.encode(wav[None, None], n_stages)[0]

    def decode(self, model, codes):
        self.calls.append(("decode", model, tuple(codes.shape)))
        return model.decode(codes[None])[0]


def test_offline_calls_go_through_the_batcher_and_streams_do_not(client, tiny):
    batcher = _RecordingBatcher()
    app = create_app(settings(), models={"tiny-test": tiny}, batcher=batcher)
    body = wav(0.45)
    with TestClient(app) as batched:
        served = app.state.runtime.models["tiny-test"]
        assert served.batcher is batcher and served.model is tiny.model  # the plain SimVQCodec, no proxy
        tok = batched.post("/encode?stages=3", content=body, headers={"content-type": "audio/wav"})
        assert (
            tok.content == client.post("/encode?stages=3", content=body, headers={"content-type": "audio/wav"}).content
        )
        audio = batched.post("/decode", content=tok.content, headers={"content-type": "application/octet-stream"})
        assert (
            audio.content
            == client.post("/decode", content=tok.content, headers={"content-type": "application/octet-stream"}).content
        )
        assert [(op, m) for op, m, _ in batcher.calls] == [("encode", tiny.model), ("decode", tiny.model)]
        assert batcher.calls[0][2] == (7200,) and batcher.calls[1][2] == (3, 23)
        with batched.websocket_connect("/v1/stream/encode") as ws:
            ws.send_text('{"type": "start"}')
            ws.receive_json()
            ws.send_bytes(np.zeros(960, "<i2").tobytes())
            ws.receive()
            ws.send_text('{"type": "end"}')
        assert len(batcher.calls) == 2


def test_dependency_override_swaps_the_model(client, other):
    client.app.dependency_overrides[get_model] = lambda: ServedModel("tiny-other", other)
    try:
        r = client.post("/encode", content=wav(0.2), headers={"content-type": "audio/wav"})
    finally:
        client.app.dependency_overrides.clear()
    assert read_tok(io.BytesIO(r.content))[0].made_with(other.sha256)


def test_not_found_and_method_not_allowed_are_problems(client):
    assert_problem(client.get("/nope"), 404, "not-found", "/nope")
    r = client.get("/encode")
    assert_problem(r, 405, "method-not-allowed", "POST")
    assert r.headers["allow"] == "POST"
    head = client.head("/")  # the listening page answers HEAD as GET, without the body
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/html") and head.content == b""


def test_metrics_count_routes_statuses_audio_and_rejections(client):
    client.post("/encode", content=wav(0.5), headers={"content-type": "audio/wav"})
    client.post("/encode", content=b"x", headers={"content-type": "text/plain"})
    text = client.get("/metrics").text
    assert 'simvq_http_requests_total{method="POST",route="/encode",status="200"}' in text
    assert 'simvq_http_requests_total{method="POST",route="/encode",status="415"}' in text
    assert 'simvq_rejections_total{reason="unsupported-media-type"}' in text
    assert 'simvq_http_request_duration_seconds_bucket{le="+Inf",route="/encode"}' in text
    line = next(x for x in text.splitlines() if x.startswith('simvq_audio_seconds_total{operation="encode"}'))
    assert float(line.split()[-1]) >= 0.5
    assert "simvq_http_requests_in_flight 1.0" in text  # the /metrics request itself


def test_openapi_declares_every_error_as_problem_json_with_examples(client):
    spec = client.get("/openapi.json").json()
    assert "Problem" in spec["components"]["schemas"] and "TokenJSON" in spec["components"]["schemas"]
    expected = {
        ("/encode", "post"): {"400", "413", "415", "422", "503", "504", "500"},
        ("/decode", "post"): {"413", "415", "422", "503", "504", "500"},
        ("/readyz", "get"): {"503"},
        ("/v1/models", "get"): {"503"},
    }
    for (path, method), statuses in expected.items():
        responses = spec["paths"][path][method]["responses"]
        assert statuses <= set(responses), (path, set(responses))
        for status in statuses:
            content = responses[status]["content"]
            assert list(content) == [PROBLEM]
            assert content[PROBLEM]["example"]["status"] == int(status)
    assert "Retry-After" in spec["paths"]["/encode"]["post"]["responses"]["503"]["headers"]
    body = spec["paths"]["/encode"]["post"]["requestBody"]["content"]
    assert {"audio/wav", "audio/flac", "audio/ogg", "multipart/form-data"} == set(body)
