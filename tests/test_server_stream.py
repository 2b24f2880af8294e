"""WebSocket streaming at the app level (TestClient): equality with offline tokens, protocol errors, limits."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from codec.tokfile import read_tok
from server import Settings, create_app, scheduler
from server.routers import stream as stream_router
from tests.support import audio_bytes, make_tiny_model, speech_like

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def make_client(tiny, **kw) -> TestClient:
    base = dict(load_in_background=False, pool_size=1, warmup=False, models=["tiny-test"])
    return TestClient(create_app(Settings(**{**base, **kw}), models={"tiny-test": tiny}))


@pytest.fixture(scope="module")
def client(tiny):
    with make_client(tiny) as c:
        yield c


def drain(ws) -> tuple[list, int | None]:
    """Every message until the server closes: (messages, close code)."""
    out = []
    while True:
        try:
            msg = ws.receive()
        except WebSocketDisconnect as exc:
            return out, exc.code
        if msg["type"] == "websocket.close":
            return out, msg.get("code")
        out.append(msg.get("bytes") if msg.get("bytes") is not None else json.loads(msg["text"]))


def pcm16(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, -1, 1) * 32767).astype("<i2")


def offline_codes(client, pcm: np.ndarray, stages: int | None = None) -> np.ndarray:
    body = audio_bytes(pcm, 16000, "WAV", "PCM_16")
    q = f"?stages={stages}" if stages else ""
    r = client.post(f"/encode{q}", content=body, headers={"content-type": "audio/wav"})
    return read_tok(io.BytesIO(r.content))[1]


@pytest.mark.parametrize("chunk_sizes", [[1, 319, 320, 321, 5000], [160], [7777]])
def test_streamed_tokens_equal_offline_tokens(client, chunk_sizes):
    pcm = pcm16(speech_like(0.93, seed=7))  # 14880 samples: 46.5 frames
    expected = offline_codes(client, pcm, stages=3)
    with client.websocket_connect("/v1/stream/encode") as ws:
        ws.send_text(json.dumps({"type": "start", "stages": 3}))
        ready = ws.receive_json()
        assert ready["type"] == "ready" and ready["n_stages"] == 3 and ready["frame_bytes"] == 6
        assert ready["sample_rate"] == 16000 and ready["hop_length"] == 320 and ready["model_id"] == "tiny-test"
        i = k = 0
        while i < len(pcm):
            n = chunk_sizes[k % len(chunk_sizes)]
            ws.send_bytes(pcm[i : i + n].tobytes())
            i, k = i + n, k + 1
        ws.send_text(json.dumps({"type": "end"}))
        messages, code = drain(ws)
    assert code == 1000
    end = messages[-1]
    assert end == {"type": "end", "num_samples": len(pcm), "num_frames": 47}
    frames = np.frombuffer(b"".join(m for m in messages if isinstance(m, bytes)), "<u2").reshape(-1, 3).T
    assert np.array_equal(frames, expected)


def test_each_frame_is_sent_as_soon_as_it_is_complete(client):
    pcm = pcm16(speech_like(0.1, seed=8))
    with client.websocket_connect("/v1/stream/encode") as ws:
        ws.send_text('{"type": "start"}')
        ws.receive_json()
        ws.send_bytes(pcm[:319].tobytes())  # not a whole frame yet: nothing comes back
        ws.send_bytes(pcm[319:320].tobytes())  # completes frame 0: its 4 codes come back at once
        first = ws.receive()
        assert len(first["bytes"]) == 4 * 2
        ws.send_bytes(pcm[320:960].tobytes())  # two more frames in one message: each as soon as it is encoded
        sizes = [len(ws.receive()["bytes"])]
        if sizes[0] < 2 * 4 * 2:
            sizes.append(len(ws.receive()["bytes"]))
        assert sizes in ([4 * 2, 4 * 2], [2 * 4 * 2])  # one message per frame, or both if the first waited
        ws.send_text('{"type": "end"}')
        messages, code = drain(ws)
    assert code == 1000 and messages[-1]["num_frames"] == 3


def test_stereo_44k_stream_is_mixed_and_resampled(client):
    x = speech_like(0.5, 44100, seed=9, channels=2)
    pcm = pcm16(x)
    with client.websocket_connect("/v1/stream/encode") as ws:
        ws.send_text(json.dumps({"type": "start", "sample_rate": 44100, "channels": 2}))
        assert ws.receive_json()["input_sample_rate"] == 44100
        ws.send_bytes(pcm[:10000].tobytes())
        ws.send_bytes(pcm[10000:].tobytes())
        ws.send_text('{"type": "end"}')
        messages, code = drain(ws)
    assert code == 1000 and messages[-1]["num_samples"] == 8000 and messages[-1]["num_frames"] == 25


def test_streamed_decode_matches_offline_decode(client):
    pcm = pcm16(speech_like(0.6, seed=10))
    body = audio_bytes(pcm, 16000, "WAV", "PCM_16")
    tok = client.post("/encode", content=body, headers={"content-type": "audio/wav"}).content
    offline = client.post("/decode", content=tok, headers={"content-type": "application/octet-stream"}).content
    import soundfile as sf

    offline_pcm = sf.read(io.BytesIO(offline), dtype="int16")[0]
    codes = read_tok(io.BytesIO(tok))[1]  # [4, 30]
    frames = codes.T.astype("<u2")
    with client.websocket_connect("/v1/stream/decode") as ws:
        ws.send_text('{"type": "start"}')
        ready = ws.receive_json()
        assert ready["n_stages"] == 4 and ready["frame_bytes"] == 8
        for lo, hi in ((0, 1), (1, 13), (13, 30)):
            ws.send_bytes(frames[lo:hi].tobytes())
        ws.send_text('{"type": "end"}')
        messages, code = drain(ws)
    assert code == 1000 and messages[-1]["num_frames"] == 30
    audio = np.frombuffer(b"".join(m for m in messages if isinstance(m, bytes)), "<i2")
    assert len(audio) == 30 * 320
    assert np.abs(audio[: len(offline_pcm)].astype(int) - offline_pcm).max() <= 1


def test_a_large_decode_message_runs_in_bounded_steps(client, monkeypatch):
    """One message of 1,234 frames (24.7 s) is decoded by the scheduler a frame per step, as every stream is,
    and gives exactly what the same frames sent as many small messages give."""
    from codec.batched import StreamBatch

    rng = np.random.default_rng(3)
    frames = rng.integers(0, 64, (1234, 4)).astype("<u2")
    seen: list[int] = []
    decode = StreamBatch.decode

    def counted(self, slots, codes, stages=None):
        seen.append(codes.shape[0])  # [streams, stages]: one frame of each stream in the step
        return decode(self, slots, codes, stages)

    monkeypatch.setattr(StreamBatch, "decode", counted)

    def pcm(messages_of: int) -> bytes:
        with client.websocket_connect("/v1/stream/decode") as ws:
            ws.send_text('{"type": "start"}')
            ws.receive_json()
            for lo in range(0, len(frames), messages_of):
                ws.send_bytes(frames[lo : lo + messages_of].tobytes())
            ws.send_text('{"type": "end"}')
            messages, code = drain(ws)
        assert code == 1000 and messages[-1] == {"type": "end", "num_samples": 1234 * 320, "num_frames": 1234}
        return b"".join(m for m in messages if isinstance(m, bytes))

    whole = np.frombuffer(pcm(len(frames)), "<i2")
    assert len(seen) >= 1234 and max(seen) == 1  # a frame per step, the one stream alone in it
    pieces = np.frombuffer(pcm(50), "<i2")
    assert len(whole) == 1234 * 320 and np.array_equal(whole, pieces)


def _error(client, path, start, payloads):
    with client.websocket_connect(path) as ws:
        if start is not None:
            ws.send_text(json.dumps(start))
        for p in payloads:
            ws.send_bytes(p) if isinstance(p, bytes) else ws.send_text(p)
        messages, code = drain(ws)
    errors = [m for m in messages if isinstance(m, dict) and m.get("type") == "error"]
    assert len(errors) == 1, messages
    return errors[0], code


def test_protocol_errors_close_with_a_reason(client):
    err, code = _error(client, "/v1/stream/encode", None, [b"\x00\x00"])
    assert code == 1003 and err["reason"] == "expected-start"
    err, code = _error(client, "/v1/stream/encode", {"type": "start", "stages": 9}, [])
    assert code == 1008 and "between 1 and 4" in err["detail"]
    err, code = _error(client, "/v1/stream/encode", {"type": "start", "format": "f32le"}, [])
    assert code == 1008 and "format" in err["detail"]
    err, code = _error(client, "/v1/stream/encode", {"type": "start", "model": "nope"}, [])
    assert code == 1008 and err["reason"] == "unknown-model"
    err, code = _error(client, "/v1/stream/encode", {"type": "start", "channels": 2}, [b"\x00" * 6])
    assert code == 1007 and "4 bytes" in err["detail"]
    err, code = _error(client, "/v1/stream/encode", {"type": "start"}, ['{"type": "pause"}'])
    assert code == 1003 and err["reason"] == "invalid-control"
    err, code = _error(client, "/v1/stream/decode", {"type": "start", "stages": 2}, [b"\x00" * 6])
    assert code == 1007 and "4 bytes" in err["detail"]
    err, code = _error(client, "/v1/stream/decode", {"type": "start", "stages": 1}, [np.array([64], "<u2").tobytes()])
    assert code == 1007 and "[0, 64)" in err["detail"]


def test_a_model_whose_stages_differ_in_width_has_a_code_width_only_where_its_stages_share_one(tmp_path):
    wide = make_tiny_model(tmp_path, codebook_size=[128, 64, 64, 64])
    with make_client(wide) as c:
        (m,) = c.get("/v1/models").json()["models"]
        assert (m["stage_bits"], m["bits_per_code"], m["codebook_size"]) == ([7, 6, 6, 6], None, None)
        for stages, width in ((1, 7), (2, None)):
            with c.websocket_connect("/v1/stream/encode") as ws:
                ws.send_text(json.dumps({"type": "start", "stages": stages}))
                ready = ws.receive_json()
                ws.send_text('{"type": "end"}')
                drain(ws)
            assert (ready["stage_bits"], ready["bits_per_code"]) == ([7, 6][:stages], width)


def test_stream_limits(tiny):
    with make_client(tiny, ws_max_message_bytes=1024, ws_idle_timeout_s=0.3, max_stream_duration_s=0.05) as c:
        err, code = _error(c, "/v1/stream/encode", {"type": "start"}, [b"\x00" * 2048])
        assert code == 1009 and err["reason"] == "message-too-large"
        err, code = _error(c, "/v1/stream/encode", {"type": "start"}, [b"\x00" * 1000, b"\x00" * 1000])
        assert code == 1008 and err["reason"] == "stream-too-long"  # 1000 samples > 0.05 s x 16 kHz
        err, code = _error(c, "/v1/stream/encode", {"type": "start"}, [])
        assert code == 1008 and err["reason"] == "idle-timeout"
        text = c.get("/metrics").text
        assert 'simvq_rejections_total{reason="idle-timeout"} 1.0' in text
        assert 'simvq_streams_open{direction="encode"} 0.0' in text


def test_streams_beyond_the_cap_are_refused_with_503(tiny):
    with make_client(tiny, max_streams=1, retry_after_s=2) as c:
        with c.websocket_connect("/v1/stream/encode") as first:
            first.send_text('{"type": "start"}')
            first.receive_json()
            with pytest.raises(WebSocketDenialResponse) as denied:
                with c.websocket_connect("/v1/stream/decode"):
                    pass
            r = denied.value
            assert r.status_code == 503 and r.headers["retry-after"] == "2"
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["type"].endswith(":streams-full")
            assert c.get("/healthz").status_code == 200
            first.send_text('{"type": "end"}')
            assert drain(first)[1] == 1000
        with c.websocket_connect("/v1/stream/decode") as again:  # the slot is free again
            again.send_text('{"type": "start"}')
            assert again.receive_json()["type"] == "ready"


def test_a_worker_behind_real_time_refuses_new_streams(tiny, monkeypatch):
    """Past `BEHIND_S` of lag (here any lag at all), a new stream gets 503 `streams-behind` while the ones
    already open go on; an idle worker takes streams again once the lag has left its window."""
    monkeypatch.setattr(stream_router, "BEHIND_S", 0.0)
    with make_client(tiny, retry_after_s=3) as c:
        with c.websocket_connect("/v1/stream/encode") as first:
            first.send_text('{"type": "start"}')
            first.receive_json()
            first.send_bytes(pcm16(speech_like(0.02, seed=3)).tobytes())  # one frame (more would be ahead of time)
            assert len(first.receive_bytes()) > 0  # its step ran, a little behind real time as every step is
            with pytest.raises(WebSocketDenialResponse) as denied:
                with c.websocket_connect("/v1/stream/decode"):
                    pass
            r = denied.value
            assert r.status_code == 503 and r.headers["retry-after"] == "3"
            assert r.json()["type"].endswith(":streams-behind") and "behind real time" in r.json()["detail"]
            first.send_text('{"type": "end"}')
            assert drain(first)[1] == 1000
        monkeypatch.setattr(scheduler, "LAG_WINDOW_S", 0.0)
        with c.websocket_connect("/v1/stream/decode") as again:
            again.send_text('{"type": "start"}')
            assert again.receive_json()["type"] == "ready"


def _pieces(x: np.ndarray, n: int) -> list[bytes]:
    return [x[i : i + n].tobytes() for i in range(0, len(x), n)]


def _run_streams(c, streams: list[tuple[str, dict, list[bytes]]]) -> list[bytes]:
    """Open every stream at once, send their messages in turn (one of each, round robin), then end them all:
    each stream's output bytes."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(c.websocket_connect(path)) for path, _, _ in streams]
        for ws, (_, start, _) in zip(sockets, streams):
            ws.send_text(json.dumps(start))
            assert ws.receive_json()["type"] == "ready"
        for k in range(max(len(msgs) for _, _, msgs in streams)):
            for ws, (_, _, msgs) in zip(sockets, streams):
                if k < len(msgs):
                    ws.send_bytes(msgs[k])
        outputs = []
        for ws in sockets:
            ws.send_text('{"type": "end"}')
            messages, code = drain(ws)
            assert code == 1000
            outputs.append(b"".join(m for m in messages if isinstance(m, bytes)))
    return outputs


def test_open_streams_share_the_model_and_each_gets_the_bytes_it_gets_alone(tiny):
    a, b = pcm16(speech_like(0.41, seed=20)), pcm16(speech_like(0.63, seed=21))
    with make_client(tiny, pool_size=2) as c:
        codes = offline_codes(c, b)  # [4, 32]
        frames = codes.T.astype("<u2")
        streams = [
            ("/v1/stream/encode", {"type": "start", "stages": 4}, _pieces(a, 333)),
            ("/v1/stream/encode", {"type": "start", "stages": 2}, _pieces(b, 640)),
            ("/v1/stream/decode", {"type": "start"}, _pieces(frames, 3)),
        ]
        together = _run_streams(c, streams)
        alone = [_run_streams(c, [s])[0] for s in streams]
        counts = {
            line.split("{")[0]: float(line.rsplit(" ", 1)[1])
            for line in c.get("/metrics").text.splitlines()
            if line.startswith("simvq_stream_step") and 'direction="encode"' in line
        }
    assert together == alone
    # /metrics counts the batched steps: together, the two encode streams shared some of theirs.
    encode_frames = 2 * sum(-(-len(x) // 320) for x in (a, b))  # each stream's frames, together and alone
    assert counts["simvq_stream_step_frames_total"] == encode_frames
    assert counts["simvq_stream_steps_total"] < encode_frames and counts["simvq_stream_step_cpu_seconds_total"] > 0
    assert np.array_equal(np.frombuffer(together[1], "<u2").reshape(-1, 2).T, codes[:2])  # the offline tokens


def test_a_stream_that_falls_behind_real_time_is_told_so_and_closed(tiny):
    with make_client(tiny, stream_max_lag_s=1e-6) as c:  # every frame's output comes later than that
        err, code = _error(c, "/v1/stream/encode", {"type": "start"}, [b"\x00" * 640])
        assert code == 1013 and err["reason"] == "behind-real-time" and "behind real time" in err["detail"]
        assert 'simvq_rejections_total{reason="behind-real-time"} 1.0' in c.get("/metrics").text
        with c.websocket_connect("/v1/stream/decode") as ws:  # the server goes on serving
            ws.send_text('{"type": "start"}')
            assert ws.receive_json()["type"] == "ready"
