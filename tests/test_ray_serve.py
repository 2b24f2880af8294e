"""Ray Serve on a local Ray instance: same tokens and audio as the plain app, batching under concurrent
requests within the audio budget, 503 beyond the queue limit, `serve --ray` and `serve build`."""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from server.app import create_app  # noqa: E402
from server.ray_serve import RayOptions, build  # noqa: E402
from server.settings import Settings  # noqa: E402
from tests.support import audio_bytes, free_port, make_tiny_model, speech_like  # noqa: E402

BUDGET_S = 3.0
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray-model")
    make_tiny_model(path, model_id="tiny-ray")
    return path


@pytest.fixture(scope="module")
def cluster(model_dir):
    """One local Ray instance and Serve on a free port for the module; two apps deployed on it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = Settings(models=[str(model_dir)], torch_threads=1)
    serve.run(
        build(settings, RayOptions(name="batched", num_cpus=0.5, batch_seconds=BUDGET_S, batch_wait_s=0.25)),
        name="batched",
        route_prefix="/b",
    )
    tight = RayOptions(name="tight", num_cpus=0.5, max_ongoing_requests=1, max_queued_requests=1, batch_wait_s=1.0)
    serve.run(build(settings.model_copy(update={"retry_after_s": 2}), tight), name="tight", route_prefix="/t")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def plain(model_dir):
    app = create_app(Settings(models=[str(model_dir)], load_in_background=False, torch_threads=1))
    with TestClient(app) as client:
        yield client


def _clips() -> list[tuple[bytes, str]]:
    """Clips of different lengths (one longer than the batch budget, one at 44.1 kHz stereo) and stage counts."""
    out = []
    for i, seconds in enumerate([0.413, 0.917, 1.3071, 0.733, 1.1013, 4.2]):
        out.append((audio_bytes(speech_like(seconds, seed=i), 16000), "stages=2" if i == 3 else ""))
    out.append((audio_bytes(speech_like(0.8123, 44100, seed=9, channels=2), 44100), ""))
    return out


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{{{want}}} in /metrics")


def test_round_trip_through_ray_equals_plain_app(cluster, plain):
    base = cluster + "/b"
    ready = httpx.get(base + "/readyz", timeout=30).json()
    assert ready["status"] == "ready" and ready["models"] == ["tiny-ray"]
    before = httpx.get(base + "/metrics", timeout=30).text
    batches_before = _metric(before, "simvq_batch_clips_count", op="encode")

    clips = _clips()

    def encode(clip: tuple[bytes, str]) -> httpx.Response:
        body, query = clip
        return httpx.post(
            f"{base}/encode?format=json&{query}", content=body, headers={"content-type": "audio/wav"}, timeout=120
        )

    with cf.ThreadPoolExecutor(len(clips)) as pool:  # concurrent: the batcher sees several clips at once
        answers = list(pool.map(encode, clips))
    for (body, query), answer in zip(clips, answers):
        assert answer.status_code == 200, answer.text
        expected = plain.post(f"/encode?format=json&{query}", content=body, headers={"content-type": "audio/wav"})
        assert expected.status_code == 200
        got, want = answer.json(), expected.json()
        assert got["num_frames"] == want["num_frames"] > 0
        assert got["codes"] == want["codes"]  # the same tokens, batched or not
        assert len(got["codes"]) == (2 if query else 4)

    toks = [plain.post("/encode", content=body, headers={"content-type": "audio/wav"}).content for body, _ in clips]

    def decode(tok: bytes) -> httpx.Response:
        return httpx.post(
            base + "/decode", content=tok, headers={"content-type": "application/octet-stream"}, timeout=120
        )

    with cf.ThreadPoolExecutor(len(toks)) as pool:
        decoded = list(pool.map(decode, toks))
    for tok, answer in zip(toks, decoded):
        assert answer.status_code == 200, answer.text
        expected = plain.post("/decode", content=tok, headers={"content-type": "application/octet-stream"})
        assert answer.content == expected.content  # byte-identical WAV: same samples as a lone decode

    metrics = httpx.get(base + "/metrics", timeout=30).text
    batches = _metric(metrics, "simvq_batch_clips_count", op="encode") - batches_before
    clips_done = _metric(metrics, "simvq_batch_clips_sum", op="encode") - _metric(
        before, "simvq_batch_clips_sum", op="encode"
    )
    assert clips_done == len(clips)
    assert batches < len(clips), "concurrent requests were never batched together"
    # every batch stays within the padded-seconds budget, except the 4.2 s clip that runs alone
    within = _metric(metrics, "simvq_batch_padded_seconds_bucket", op="encode", le=f"{BUDGET_S:.1f}")
    total = _metric(metrics, "simvq_batch_padded_seconds_count", op="encode")
    assert total - within == 1
    assert _metric(metrics, "simvq_batch_clips_count", op="decode") > 1


def test_streaming_is_not_batched_and_matches(cluster, plain):
    websockets = pytest.importorskip("websockets.sync.client")
    pcm = (speech_like(0.6, seed=3) * 32767).astype("<i2")
    ws_url = cluster.replace("http", "ws") + "/b/v1/stream/encode"
    frames = []
    with websockets.connect(ws_url, open_timeout=30) as ws:
        ws.send('{"type": "start"}')
        ready = ws.recv()
        assert '"ready"' in ready
        for i in range(0, len(pcm), 512):
            ws.send(pcm[i : i + 512].tobytes())
        ws.send('{"type": "end"}')
        for message in ws:
            if isinstance(message, str):
                break
            frames.append(np.frombuffer(message, "<u2").reshape(-1, 4))
    streamed = np.concatenate(frames).T
    offline = plain.post(
        "/encode?format=json", content=audio_bytes(pcm, 16000, subtype="PCM_16"), headers={"content-type": "audio/wav"}
    ).json()["codes"]
    assert streamed.tolist() == offline


def test_queue_limit_answers_503(cluster):
    body = audio_bytes(speech_like(0.3), 16000)

    def encode(_: int) -> httpx.Response:
        return httpx.post(cluster + "/t/encode", content=body, headers={"content-type": "audio/wav"}, timeout=120)

    with cf.ThreadPoolExecutor(8) as pool:  # 1 in the replica, 1 queued, the rest refused
        answers = list(pool.map(encode, range(8)))
    codes = sorted(a.status_code for a in answers)
    assert codes.count(200) >= 1
    assert codes.count(503) >= 4, codes
    assert set(codes) <= {200, 503}
    refused = next(a for a in answers if a.status_code == 503)
    assert refused.headers["retry-after"] == "2"  # SIMVQ_RETRY_AFTER_S of the deployed settings
    assert "max_queued_requests=1" in refused.text  # Ray's own answer: the replica never saw the request


def test_serve_cli_deploys_on_the_cluster_and_stops(cluster, model_dir):
    """`simvq-codec serve --ray` joins the running cluster, serves the app, removes it on SIGINT."""
    env = {
        **os.environ,
        "SIMVQ_MODELS": str(model_dir),
        "SIMVQ_RAY_NAME": "cli",
        "SIMVQ_RAY_ROUTE_PREFIX": "/cli",
        "SIMVQ_RAY_NUM_CPUS": "0.25",
        "SIMVQ_TORCH_THREADS": "1",
    }
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "codec.cli",
            "serve",
            "--ray",
            "--ray-address",
            address,
            "--port",
            cluster.rsplit(":", 1)[1],
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(cluster + "/cli/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        else:
            raise AssertionError("the app started by `serve --ray` never became ready")
        models = httpx.get(cluster + "/cli/v1/models", timeout=10).json()["models"]
        assert [m["id"] for m in models] == ["tiny-ray"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "serving on http://" in out
    assert httpx.get(cluster + "/cli/readyz", timeout=10).status_code == 404  # the app was removed
    assert httpx.get(cluster + "/b/readyz", timeout=10).status_code == 200  # the others were left alone


def test_serve_build_reads_the_import_path_and_options(tmp_path):
    """`serve build server.ray_serve:app` (what `serve run` / `serve deploy` import) with autoscaling options."""
    env = {**os.environ, "SIMVQ_RAY_REPLICAS": "0", "SIMVQ_RAY_MAX_REPLICAS": "6", "SIMVQ_RAY_MAX_QUEUED_REQUESTS": "5"}
    out = tmp_path / "serve.yaml"
    subprocess.run(
        [str(Path(sys.executable).with_name("serve")), "build", "server.ray_serve:app", "-o", str(out)],
        env=env,
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=120,
    )
    import yaml

    config = yaml.safe_load(out.read_text())
    deployment = config["applications"][0]["deployments"][0]
    assert config["applications"][0]["import_path"] == "server.ray_serve:app"
    assert deployment["autoscaling_config"]["max_replicas"] == 6
    assert deployment["max_queued_requests"] == 5
    assert deployment["max_ongoing_requests"] == 8


def test_options_reject_unknown_and_invalid_values():
    from server.ray_serve import build_app, options_from_env

    with pytest.raises(Exception, match="extra"):
        build_app({"replica": "2"})
    with pytest.raises(ValueError, match="SIMVQ_RAY_BATCH_SECONDS"):
        options_from_env(batch_seconds=-1)
    assert options_from_env(replicas=3).replicas == 3


def test_run_jobs_groups_batches_and_matches_lone_calls(tmp_path):
    """The replica's batch runner without Ray: mixed stage counts, padding, decode, and an error kept to its group."""
    import torch

    from server.ray_serve import Job, padded_ms, run_jobs

    model = make_tiny_model(tmp_path / "m", encoder_dim=64, encoder_layers=2, latent_dim=16, codebook_size=256).model
    lengths = [0.413, 0.917, 1.3071, 0.05, 0.2345, 0.6789]
    clips = [torch.from_numpy(speech_like(s, seed=i)) for i, s in enumerate(lengths)]
    stages = [4, 2, 4, 3, 2, 4]
    jobs = [Job("encode", model, c, n, round(1000 * len(c) / 16000)) for c, n in zip(clips, stages)]
    assert padded_ms(jobs) == 6 * 1307
    codes = run_jobs(jobs)
    for clip, n, got in zip(clips, stages, codes):
        assert torch.equal(got, model.encode(clip[None, None], n)[0])

    decodes = [Job("decode", model, c, None, 0) for c in codes]
    bad = codes[1].clone()
    bad[0, 0] = 999  # outside the 256-code book: fails its group (2 stages) only
    decodes[1] = Job("decode", model, bad, None, 0)
    audio = run_jobs(decodes)
    for c, got in zip(codes, audio):
        if len(c) == 2:
            assert isinstance(got, ValueError)
        else:
            assert torch.equal(got, model.decode(c[None])[0])
            assert got.shape[-1] == c.shape[-1] * 320


def test_take_batch_fills_the_budget_in_arrival_order_one_operation_at_a_time():
    from server.ray_serve import Job, take_batch

    def job(op: str, ms: int) -> Job:
        return Job(op, None, None, None, ms)

    pending = [
        job("encode", 5000),
        job("decode", 1000),
        job("encode", 4000),
        job("encode", 6000),
        job("encode", 9000),
        job("encode", 1000),
    ]
    assert take_batch(pending, 20_000) == [0, 2, 3]  # 3 x 6 s = 18 s; a fourth clip would make 4 x 9 s
    assert take_batch(pending, 10_000) == [0, 2]  # 2 x 5 s fits exactly
    assert take_batch(pending, 9_999) == [0]
    assert take_batch(pending[1:], 20_000) == [0]  # the oldest job decides the operation
    assert take_batch([job("encode", 30_000), job("encode", 10)], 20_000) == [0]  # too long: alone
