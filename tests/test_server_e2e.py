"""End to end on a real uvicorn server on a loopback port: round trips, streaming, every limit, draining."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from codec.audio import read_audio
from codec.tokfile import read_tok
from server import Settings, create_app
from tests.support import (
    REPO,
    LoopbackServer,
    audio_bytes,
    free_port,
    gated,
    make_tiny_model,
    real_recording,
    speech_like,
    wait_ready,
)

torch.set_num_threads(1)
PROBLEM = "application/problem+json"
MEDIA = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg"}


@pytest.fixture(scope="module")
def recording():
    path = real_recording()
    if path is None:
        pytest.skip("no real recording: neither examples/speech.wav nor klettres-data is installed")
    return path


@pytest.fixture(scope="module")
def server():
    """The default model (the shipped stand-in until training finishes), loaded in the background."""
    settings = Settings(pool_size=2, max_body_bytes=600 * 1024, max_duration_s=30, request_timeout_s=20)
    with LoopbackServer(create_app(settings)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        wait_ready(client)
        yield srv, client


def encode(client, body: bytes, media: str, query: str = "") -> httpx.Response:
    return client.post(f"/encode{query}", content=body, headers={"content-type": media})


def test_round_trip_of_a_real_recording(server, recording):
    _, client = server
    body = recording.read_bytes()
    r = encode(client, body, MEDIA[recording.suffix])
    assert r.status_code == 200, r.text
    header, codes = read_tok(io.BytesIO(r.content))
    expected_samples = len(read_audio(recording, 16000)[0])
    assert header.hop_length == 320 and header.n_stages == 12 and header.stage_bits == (14, 14) + (10,) * 10
    assert header.num_samples == expected_samples and codes.shape == (12, -(-expected_samples // 320))
    assert len(r.content) == header.file_bytes()  # bit-packed: ~6 kbit/s
    info = client.get("/v1/models").json()["models"][0]
    assert info["weights_hash"].startswith(header.weights_hash.hex()) and info["id"] == "simvq-16k"
    d = client.post("/decode", content=r.content, headers={"content-type": "application/octet-stream"})
    assert d.status_code == 200 and d.headers["content-type"] == "audio/wav"
    audio, rate = sf.read(io.BytesIO(d.content), dtype="float32")
    assert rate == 16000 and audio.shape == (expected_samples,)
    assert np.isfinite(audio).all() and float(d.headers["x-audio-seconds"]) == pytest.approx(expected_samples / 16000)
    if info["trained"]:  # a trained model's round trip has the input's spectrogram (noise scores about 0)
        original = read_audio(recording, 16000)[0]
        assert np.corrcoef(log_mel(original), log_mel(audio))[0, 1] > 0.5


def log_mel(audio: np.ndarray) -> np.ndarray:
    import librosa

    mel = librosa.feature.melspectrogram(y=audio, sr=16000, n_fft=1024, hop_length=320, n_mels=64)
    return np.log(mel + 1e-5).ravel()


def test_json_binary_and_multipart_forms_agree(server, recording):
    _, client = server
    body = recording.read_bytes()
    tok = encode(client, body, MEDIA[recording.suffix], "?stages=5")
    js = encode(client, body, MEDIA[recording.suffix], "?stages=5&format=json").json()
    form = client.post("/encode?bitrate=3", files={"file": (recording.name, body, "application/octet-stream")})
    header, codes = read_tok(io.BytesIO(tok.content))
    assert form.content == tok.content  # 3 kbit/s = 5 stages (2.8 kbit/s)
    assert np.array_equal(np.array(js["codes"]), codes) and js["n_stages"] == 5
    for key in ("hop_length", "n_stages", "bits_per_code", "num_samples", "num_frames"):
        assert js[key] == getattr(header, key)
    assert (js["model_id"], js["sample_rate"], js["stage_bits"]) == ("simvq-16k", 16000, list(header.stage_bits))
    a = client.post("/decode", content=tok.content, headers={"content-type": "application/octet-stream"})
    b = client.post("/decode", json=js)
    assert a.status_code == b.status_code == 200 and a.content == b.content


def test_websocket_round_trip_equals_offline_tokens(server, recording):
    srv, client = server
    pcm = np.round(np.clip(read_audio(recording, 16000)[0], -1, 1) * 32767).astype("<i2")
    tok = encode(client, audio_bytes(pcm, 16000, "WAV", "PCM_16"), "audio/wav")
    offline = read_tok(io.BytesIO(tok.content))[1]
    sizes = [320, 1, 999, 4000, 160]
    received: list[bytes] = []
    with connect(srv.ws_url + "/v1/stream/encode") as ws:
        ws.send(json.dumps({"type": "start"}))
        ready = json.loads(ws.recv())
        assert ready["n_stages"] == 12 and ready["frame_bytes"] == 24
        i = k = 0
        while i < len(pcm):
            ws.send(pcm[i : i + sizes[k % len(sizes)]].tobytes())
            i, k = i + sizes[k % len(sizes)], k + 1
        ws.send(json.dumps({"type": "end"}))
        for message in ws:
            if isinstance(message, str):
                end = json.loads(message)
                break
            received.append(message)
    assert end == {"type": "end", "num_samples": len(pcm), "num_frames": offline.shape[1]}
    streamed = np.frombuffer(b"".join(received), "<u2").reshape(-1, 12).T
    assert np.array_equal(streamed, offline)  # bit for bit: the scheduler encodes as POST /encode does

    # and back: the streamed decode of the offline tokens equals their offline decode, bit for bit
    decoded = client.post("/decode", content=tok.content, headers={"content-type": "application/octet-stream"})
    offline_audio = sf.read(io.BytesIO(decoded.content), dtype="int16")[0]
    chunks: list[bytes] = []
    with connect(srv.ws_url + "/v1/stream/decode") as ws:
        ws.send(json.dumps({"type": "start"}))
        json.loads(ws.recv())
        frames = offline.T.astype("<u2")
        for lo in range(0, len(frames), 7):
            ws.send(frames[lo : lo + 7].tobytes())
        ws.send(json.dumps({"type": "end"}))
        for message in ws:
            if isinstance(message, str):
                break
            chunks.append(message)
    audio = np.frombuffer(b"".join(chunks), "<i2")
    assert len(audio) == offline.shape[1] * 320
    assert np.array_equal(audio[: len(offline_audio)], offline_audio)


def test_a_refused_websocket_logs_no_error(tmp_path):
    import logging

    from websockets.exceptions import InvalidStatus

    app = create_app(
        Settings(models=["tiny-test"], pool_size=1, max_streams=1, warmup=False),
        models={"tiny-test": make_tiny_model(tmp_path)},
    )
    srv = LoopbackServer(app)  # configures uvicorn's loggers: listen after that
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        with srv, connect(srv.ws_url + "/v1/stream/encode") as first:
            first.send(json.dumps({"type": "start"}))
            assert json.loads(first.recv())["type"] == "ready"
            for _ in range(3):
                with pytest.raises(InvalidStatus) as refused:
                    connect(srv.ws_url + "/v1/stream/decode").close()
                response = refused.value.response
                assert response.status_code == 503 and response.headers["retry-after"] == "1"
                assert json.loads(response.body)["type"].endswith(":streams-full")
            first.send(json.dumps({"type": "end"}))
            assert json.loads([m for m in first if isinstance(m, str)][-1])["type"] == "end"
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == []


def test_a_500_is_logged_once_and_keeps_the_connection_for_the_next_request(tmp_path):
    import http.client
    import logging

    app = create_app(
        Settings(models=["tiny-test"], pool_size=1, warmup=False, load_in_background=False),
        models={"tiny-test": make_tiny_model(tmp_path)},
    )

    async def boom() -> None:
        raise OverflowError("Python int too large to convert to C long")

    app.add_api_route("/boom", boom)
    srv = LoopbackServer(app)  # configures uvicorn's loggers: listen after that
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "server")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with srv:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
            for i in range(6):
                conn.request("GET", "/boom")
                r = conn.getresponse()
                assert r.status == 500 and json.loads(r.read())["type"].endswith(":internal-error")
                local = conn.sock.getsockname()
                conn.request("GET", "/healthz")  # on the same keep-alive connection
                r = conn.getresponse()
                assert r.status == 200 and json.loads(r.read()) == {"status": "alive"}, i
                assert conn.sock.getsockname() == local, "the connection was closed and reopened"
            conn.close()
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["unhandled error on GET /boom"] * 6


def assert_problem(r: httpx.Response, status: int, reason: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == status and body["type"] == f"urn:simvq-codec:problem:{reason}" and body["detail"]
    assert "Traceback" not in r.text
    return body


def test_every_input_limit_answers_with_its_status(server):
    _, client = server
    big = audio_bytes(speech_like(20.0), 16000)  # 640 kB > 600 kB
    assert_problem(encode(client, big, "audio/wav"), 413, "body-too-large")

    def chunked():
        for i in range(0, len(big), 16384):
            yield big[i : i + 16384]

    r = client.post("/encode", content=chunked(), headers={"content-type": "audio/wav"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert_problem(r, 413, "body-too-large")
    long = audio_bytes(np.zeros(31 * 4000, np.float32), 4000, "WAV", "PCM_U8")  # 31 s > 30 s, 124 kB
    assert_problem(encode(client, long, "audio/wav"), 413, "audio-too-long")
    assert_problem(encode(client, b"ID3junk", "audio/mpeg"), 415, "unsupported-media-type")
    assert_problem(encode(client, audio_bytes(np.zeros(800), 8000, "AIFF"), "audio/wav"), 415, "unsupported-container")
    assert_problem(
        encode(client, audio_bytes(np.zeros(800), 8000, "WAV", "ALAW"), "audio/wav"), 415, "unsupported-sample-format"
    )
    assert_problem(encode(client, audio_bytes(np.zeros(800), 1000, "WAV"), "audio/wav"), 422, "invalid-sample-rate")
    assert_problem(encode(client, audio_bytes(np.zeros((800, 12)), 8000, "WAV"), "audio/wav"), 422, "invalid-channels")
    nan = speech_like(0.2)
    nan[5] = np.inf
    assert_problem(encode(client, audio_bytes(nan, 16000, "WAV", "FLOAT"), "audio/wav"), 422, "invalid-audio")
    assert_problem(encode(client, b"RIFF\x00\x00\x00\x00WAVE", "audio/wav"), 422, "invalid-audio")
    assert_problem(
        encode(client, audio_bytes(np.zeros(800), 8000), "audio/wav", "?stages=13"), 422, "invalid-parameter"
    )
    tok = encode(client, audio_bytes(speech_like(0.5), 16000), "audio/wav").content
    assert_problem(
        client.post("/decode", content=tok[:-1], headers={"content-type": "application/octet-stream"}),
        422,
        "invalid-token-file",
    )
    js = encode(client, audio_bytes(speech_like(0.5), 16000), "audio/wav", "?format=json").json()
    assert_problem(
        client.post("/decode", json={**js, "num_samples": 16000 * 40, "num_frames": 2000}), 413, "audio-too-long"
    )
    # none of these affected the next request
    assert encode(client, audio_bytes(speech_like(0.5), 16000), "audio/wav").status_code == 200


@pytest.fixture()
def busy_server(tmp_path):
    model = gated(make_tiny_model(tmp_path))
    settings = Settings(
        models=["tiny-test"], pool_size=2, max_concurrency=2, request_timeout_s=1.5, retry_after_s=2, warmup=False
    )
    app = create_app(settings, models={"tiny-test": model})
    with LoopbackServer(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        wait_ready(client)
        yield srv, client, model, app
        model.model.gate.set()


def test_overload_503_and_deadline_504_while_health_stays_answered(busy_server):
    srv, client, model, app = busy_server
    body = audio_bytes(speech_like(0.2), 16000)
    with ThreadPoolExecutor(2) as pool, httpx.Client(base_url=srv.url, timeout=30) as other:
        stuck = [
            pool.submit(other.post, "/encode", content=body, headers={"content-type": "audio/wav"}) for _ in range(2)
        ]
        while app.state.runtime.slots.busy < 2:
            time.sleep(0.01)
        t0 = time.perf_counter()
        r = encode(client, body, "audio/wav")
        assert time.perf_counter() - t0 < 1.0  # refused at once, not queued behind the 1.5 s deadline
        assert_problem(r, 503, "overloaded")
        assert r.headers["retry-after"] == "2"
        for path in ("/healthz", "/readyz", "/metrics"):
            t0 = time.perf_counter()
            assert client.get(path).status_code == 200
            assert time.perf_counter() - t0 < 1.0
        for future in stuck:
            assert_problem(future.result(), 504, "deadline-exceeded")
    assert app.state.runtime.slots.busy == 2  # the abandoned encodes still hold their slots
    model.model.gate.set()
    deadline = time.monotonic() + 10
    while app.state.runtime.slots.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert encode(client, body, "audio/wav").status_code == 200
    metrics = client.get("/metrics").text
    assert 'simvq_rejections_total{reason="overloaded"} 1.0' in metrics
    assert 'simvq_rejections_total{reason="deadline-exceeded"} 2.0' in metrics
    assert 'simvq_http_requests_total{method="POST",route="/encode",status="504"} 2.0' in metrics


def slow_upload(port: int, body: bytes, stop, byte_every_s: float = 0.1) -> bytes:
    """POST /encode whose body trickles in a byte at a time; returns what the server answered (b"" if
    it only closed the connection)."""
    import select
    import socket

    head = (
        f"POST /encode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: audio/wav\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    answer = b""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head + body[:10])
        for i in range(10, len(body)):
            if select.select([sock], [], [], byte_every_s)[0] or stop.is_set():
                break
            try:
                sock.sendall(body[i : i + 1])
            except OSError:
                break
        sock.settimeout(10)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    return answer


def test_slow_uploads_take_no_work_slot_and_are_cut_at_the_minimum_rate(tmp_path):
    import threading

    settings = Settings(
        models=["tiny-test"],
        pool_size=1,
        max_concurrency=1,
        warmup=False,
        upload_min_bytes_per_s=4000,
        upload_grace_s=2.0,
    )
    app = create_app(settings, models={"tiny-test": make_tiny_model(tmp_path)})
    body = audio_bytes(speech_like(0.5), 16000)
    stop = threading.Event()
    with (
        LoopbackServer(app) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as client,
        ThreadPoolExecutor(2) as pool,
    ):
        wait_ready(client)
        slow = [pool.submit(slow_upload, srv.port, body, stop) for _ in range(2)]
        time.sleep(0.5)  # both are connected and trickling
        try:
            for _ in range(3):  # the one work slot stays free for clients that send their body
                assert encode(client, body, "audio/wav").status_code == 200
            assert app.state.runtime.slots.busy == 0
        finally:
            stop.set()  # before the fix, the slow senders would hold out for minutes
        answers = [f.result(timeout=30) for f in slow]
        assert all(a.startswith(b"HTTP/1.1 408") and b"upload-too-slow" in a for a in answers), answers
        metrics = client.get("/metrics").text
        assert 'simvq_rejections_total{reason="upload-too-slow"} 2.0' in metrics


def test_bodies_being_received_are_bounded_in_bytes(tmp_path):
    import threading

    body = audio_bytes(speech_like(0.5), 16000)  # 16,044 bytes
    settings = Settings(
        models=["tiny-test"],
        pool_size=1,
        warmup=False,
        max_body_bytes=20_000,
        max_upload_bytes=20_000,
        upload_min_bytes_per_s=4000,
        upload_grace_s=1.0,
    )
    app = create_app(settings, models={"tiny-test": make_tiny_model(tmp_path)})
    stop = threading.Event()
    with (
        LoopbackServer(app) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as client,
        ThreadPoolExecutor(1) as pool,
    ):
        wait_ready(client)
        slow = pool.submit(slow_upload, srv.port, body, stop)
        while app.state.runtime.upload_bytes.busy == 0:
            time.sleep(0.01)
        r = encode(client, body, "audio/wav")  # its declared length does not fit beside the slow one
        assert_problem(r, 503, "uploads-busy")
        assert r.headers["retry-after"] == "1"
        assert slow.result(timeout=30).startswith(b"HTTP/1.1 408")  # cut at the minimum rate
        assert app.state.runtime.upload_bytes.busy == 0
        assert encode(client, body, "audio/wav").status_code == 200


def test_graceful_shutdown_drains_requests_in_flight(tmp_path):
    model = gated(make_tiny_model(tmp_path))
    app = create_app(
        Settings(models=["tiny-test"], pool_size=1, warmup=False, request_timeout_s=30), models={"tiny-test": model}
    )
    srv = LoopbackServer(app).__enter__()
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        wait_ready(client)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(encode, client, audio_bytes(speech_like(0.3), 16000), "audio/wav")
            while app.state.runtime.slots.busy == 0:
                time.sleep(0.01)
            srv.server.should_exit = True  # what SIGTERM does
            time.sleep(0.3)
            assert srv.thread.is_alive() and not pending.done()  # still draining
            model.model.gate.set()
            assert pending.result().status_code == 200
    srv.thread.join(10)
    assert not srv.thread.is_alive() and app.state.runtime is None


@contextlib.contextmanager
def cli_server(tmp_path, **settings: str) -> Iterator[tuple[subprocess.Popen, httpx.Client, int]]:
    """`python -m server serve` on a free port with these SIMVQ_* settings, once ready: (process, client, port)."""
    port = free_port()
    env = {
        **os.environ,
        "SIMVQ_POOL_SIZE": "1",
        "PYTHONPATH": str(REPO),
        **{f"SIMVQ_{key.upper()}": value for key, value in settings.items()},
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.2)
            yield proc, client, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_starts_uvicorn_and_stops_on_sigterm(tmp_path, recording):
    with cli_server(tmp_path) as (proc, client, _):
        r = encode(client, recording.read_bytes(), MEDIA[recording.suffix], "?bitrate=1.5")
        assert r.status_code == 200 and read_tok(io.BytesIO(r.content))[0].n_stages == 2  # 1.3 kbit/s
        d = client.post("/decode?format=flac", content=r.content, headers={"content-type": "application/octet-stream"})
        assert d.status_code == 200 and d.content[:4] == b"fLaC"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
        log = proc.stdout.read()
        assert "Application shutdown complete" in log and "Traceback" not in log


def test_cli_serve_explains_an_oversized_message_and_times_out_slow_headers(tmp_path):
    import select
    import socket

    with cli_server(tmp_path, ws_max_message_bytes="1024", keep_alive_timeout_s="1") as (_, client, port):
        with connect(f"ws://127.0.0.1:{port}/v1/stream/decode") as ws:  # 3 KiB: past the limit, under uvicorn's
            ws.send('{"type": "start"}')
            assert json.loads(ws.recv())["type"] == "ready"
            ws.send(b"\x00" * 3072)
            error = json.loads(ws.recv())
            assert error["type"] == "error" and error["reason"] == "message-too-large" and error["code"] == 1009
            with pytest.raises(ConnectionClosed):
                ws.recv()
            assert ws.close_code == 1009
        for request in (b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n", b""):  # a byte every 0.2 s, or nothing
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                started, answer = time.monotonic(), b""
                for byte in request:
                    sock.sendall(bytes([byte]))
                    if select.select([sock], [], [], 0.2)[0]:  # the server answered: send no more
                        break
                while chunk := sock.recv(4096):
                    answer += chunk
                waited = time.monotonic() - started
            assert answer.startswith(b"HTTP/1.1 408 ") and b"header-timeout" in answer, answer
            assert 0.9 < waited < 6, waited  # the deadline is 1 s; the rest is a loaded machine's slack
        assert client.get("/healthz").status_code == 200  # a prompt request is served as before


def test_cli_serve_names_the_option_that_is_out_of_range(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--port", "99999"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr == "simvq-codec: error: --port: Input should be less than or equal to 65535\n"
