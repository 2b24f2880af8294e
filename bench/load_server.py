"""Load script for the service (a benchmark, not a test): concurrent clients on loopback for a bounded time.

It starts `python -m server serve` on a free loopback port (or targets `--url`), then runs two phases
per operation: as many clients as the concurrency cap, and twice as many (where 503s are expected and
nothing else). For each it prints requests/s, p50/p99 latency of the successful requests, status counts,
the non-503 errors (target 0), the slowest /healthz answer during the phase, and the server's peak RSS.

    python bench/load_server.py                       # 5 s clips, encode and decode, 10 s per phase
    python bench/load_server.py --seconds 20 --ops roundtrip --max-concurrency 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.support import audio_bytes, real_recording, speech_like  # noqa: E402


@dataclass
class PhaseResult:
    """What one phase measured."""

    op: str
    clients: int
    seconds: float
    requests: int
    ok: int
    rejected_503: int
    other_errors: int
    rps_ok: float
    p50_ms: float | None
    p99_ms: float | None
    health_max_ms: float | None
    server_peak_rss_mb: float | None
    statuses: dict[str, int] = field(default_factory=dict)


def clip(seconds: float) -> bytes:
    """A `seconds`-long 16 kHz 16-bit WAV: a real recording looped if one is installed, else synthetic."""
    path = real_recording()
    if path is not None:
        from codec.audio import read_audio

        x = read_audio(path, 16000)[0]
        x = np.tile(x, int(np.ceil(seconds * 16000 / len(x))))[: int(seconds * 16000)]
    else:
        x = speech_like(seconds)
    return audio_bytes(x, 16000, "WAV", "PCM_16")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak(pid: int) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


async def _client(
    client: httpx.AsyncClient,
    op: str,
    wav: bytes,
    tok: bytes,
    stop: float,
    latencies: list[float],
    statuses: dict[str, int],
) -> None:
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        try:
            if op == "encode":
                r = await client.post("/encode", content=wav, headers={"content-type": "audio/wav"})
            elif op == "decode":
                r = await client.post("/decode", content=tok, headers={"content-type": "application/octet-stream"})
            else:  # roundtrip: encode then decode what came back
                r = await client.post("/encode", content=wav, headers={"content-type": "audio/wav"})
                if r.status_code == 200:
                    r = await client.post(
                        "/decode", content=r.content, headers={"content-type": "application/octet-stream"}
                    )
            key = str(r.status_code)
            if r.status_code == 503:
                # an overloaded client backs off as told, but briefly, to keep pressure on the cap
                await asyncio.sleep(min(float(r.headers.get("retry-after", "1")), 0.05))
        except httpx.HTTPError as exc:
            key = type(exc).__name__
        statuses[key] = statuses.get(key, 0) + 1
        if key == "200":
            latencies.append(time.perf_counter() - t0)


async def _health_probe(url: str, stop: float, worst: list[float]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await client.get("/healthz")
            if r.status_code == 200:
                worst.append(time.perf_counter() - t0)
            await asyncio.sleep(0.25)


async def run_phase(
    url: str, op: str, clients: int, seconds: float, wav: bytes, tok: bytes, pid: int | None
) -> PhaseResult:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    health: list[float] = []
    peak = [0.0]
    if pid:
        _reset_peak(pid)
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    start = time.perf_counter()
    stop = start + seconds

    async def sample_rss() -> None:
        while time.perf_counter() < stop:
            if pid:
                peak[0] = max(peak[0], _rss_mb(pid, "VmRSS") or 0.0)
            await asyncio.sleep(0.1)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(
            *(_client(client, op, wav, tok, stop, latencies, statuses) for _ in range(clients)),
            _health_probe(url, stop, health),
            sample_rss(),
        )
    elapsed = time.perf_counter() - start
    if pid:
        peak[0] = max(peak[0], _rss_mb(pid, "VmHWM") or 0.0)
    ms = np.array(latencies) * 1000
    ok = statuses.get("200", 0)
    rejected = statuses.get("503", 0)
    return PhaseResult(
        op=op,
        clients=clients,
        seconds=round(elapsed, 2),
        requests=sum(statuses.values()),
        ok=ok,
        rejected_503=rejected,
        other_errors=sum(statuses.values()) - ok - rejected,
        rps_ok=round(ok / elapsed, 2),
        p50_ms=round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        p99_ms=round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
        health_max_ms=round(max(health) * 1000, 1) if health else None,
        server_peak_rss_mb=round(peak[0], 1) if pid else None,
        statuses=statuses,
    )


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    env = {"SIMVQ_MAX_CONCURRENCY": str(args.max_concurrency), "SIMVQ_TORCH_THREADS": str(args.torch_threads)}
    if args.pool_size:
        env["SIMVQ_POOL_SIZE"] = str(args.pool_size)
    if args.model:
        env["SIMVQ_MODELS"] = args.model
    return serve(env)


def serve(settings: dict[str, str], prefix: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """`python -m server serve` on a free loopback port with `SIMVQ_*` `settings`, the command behind `prefix`
    (e.g. `taskset -c 0`); returns once /readyz answers 200: (process, base URL)."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), **settings}
    command = [*prefix, sys.executable, "-m", "server", "serve", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready in 120 s")


def stop_server(proc: subprocess.Popen | None) -> None:
    """SIGTERM (the service drains), then kill after 30 s."""
    if proc is None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="target a running server instead of starting one (no memory figures)")
    p.add_argument("--clip-seconds", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each phase")
    p.add_argument("--ops", nargs="+", default=["encode", "decode"], choices=["encode", "decode", "roundtrip"])
    p.add_argument("--max-concurrency", type=int, default=4, help="SIMVQ_MAX_CONCURRENCY of the started server")
    p.add_argument("--pool-size", type=int, help="SIMVQ_POOL_SIZE (default: CPU count)")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--model", help="SIMVQ_MODELS (default: the default model)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    proc = None
    if args.url:
        url, pid, cap = args.url.rstrip("/"), None, args.max_concurrency
    else:
        proc, url = start_server(args)
        pid, cap = proc.pid, args.max_concurrency
    try:
        wav = clip(args.clip_seconds)
        tok = httpx.post(url + "/encode", content=wav, headers={"content-type": "audio/wav"}, timeout=60).content
        model = httpx.get(url + "/v1/models").json()["models"][0]
        print(
            f"server {url}  model {model['id']} (trained: {model['trained']})  cap {cap}  "
            f"clip {args.clip_seconds:g} s ({len(wav)} B wav, {len(tok)} B tok)  cpus {os.cpu_count()}  "
            f"load avg {os.getloadavg()[0]:.2f}"
        )
        if pid:
            print(f"server RSS after warm-up: {_rss_mb(pid, 'VmRSS'):.1f} MB")
        results = []
        header = (
            f"{'op':9} {'clients':>7} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'ok':>6} {'503':>6} "
            f"{'errors':>6} {'health max ms':>13} {'peak RSS MB':>11}"
        )
        print(header)
        for op in args.ops:
            for clients in (cap, 2 * cap):
                r = asyncio.run(run_phase(url, op, clients, args.seconds, wav, tok, pid))
                results.append(r)
                fmt = lambda v: "-" if v is None else f"{v}"  # noqa: E731
                print(
                    f"{r.op:9} {r.clients:>7} {r.rps_ok:>7} {fmt(r.p50_ms):>8} {fmt(r.p99_ms):>8} {r.ok:>6} "
                    f"{r.rejected_503:>6} {r.other_errors:>6} {fmt(r.health_max_ms):>13} "
                    f"{fmt(r.server_peak_rss_mb):>11}",
                    flush=True,
                )
                if r.other_errors:
                    print(f"  non-503 errors: {r.statuses}")
        print(f"load avg at end {os.getloadavg()[0]:.2f}")
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
        return 1 if any(r.other_errors for r in results) else 0
    finally:
        stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())
