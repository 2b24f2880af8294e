"""Benchmark: two-way real-time WebSocket streams that one worker on one core carries.

    python bench/streams_per_core.py [--streams 20,30,40] [--seconds 8] [--server-core 0]

A two-way stream is one side of a call: an encode stream (16-bit PCM in, tokens out) and a decode stream
(tokens in, PCM out), each sending one 20 ms frame every 20 ms of wall clock, from examples/speech.wav and its
tokens (each stream from its own point of the 10.4 s clip, wrapping round it). For each N the bench opens N of
them (2N WebSocket connections) on loopback, paces them from random phases for `--seconds`, and takes each
frame's delay: when its output arrived minus when the client's real-time schedule sent the frame (so a late
client counts against the server). Over the paced part it also reports the server's CPU, the share of it
its batched model steps took (from /metrics; the rest is the WebSocket traffic), the frames a step carried
on average, and the clients' CPU. The first second is warm-up. A run passes when the p99 delay is at most
20 ms and no stream was refused or closed; the figure is the largest N that passes.

The figure depends on the machine's speed at the time, which on a shared or virtual machine moves with what
other tenants do: on the development machine, an encode and a decode step of 16 streams took from 6.7 to 12
ms. So the bench also times that step pair alone on the server's core, before and after the runs.

The server is `python -m server serve` (one worker, torch on one thread, the bundled model unless `--model`)
under `taskset -c <server core>`, with the stream cap lifted; the clients run here, on the other cores. The
cap the server measures for itself during its warm-up (`max_streams` in /readyz) is printed too. Beside it,
for scale: Opus's cost per 20 ms frame (libopus encode and decode at 6 kbit/s, 16 kHz, through ctypes) on
the same machine. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from load_server import serve, stop_server  # noqa: E402
from step_profile import frames_of  # noqa: E402

from server.scheduler import LAG_WINDOW_S  # noqa: E402

FRAME_S = 0.02
HOP = 320
WARMUP_S = 1.0


@dataclass
class Run:
    """What one N measured."""

    pairs: int
    delays_ms: list[float] = field(default_factory=list)
    lost: int = 0  # connections refused or closed before their end
    frames_expected: int = 0
    server_cpu: float = float("nan")  # share of its core the server used over the run
    step_cpu: float = float("nan")  # of which the scheduler's model steps (the rest: the WebSocket traffic)
    frames_per_step: float = float("nan")
    client_cpu: float = float("nan")  # cores the clients (this process) used over the paced part

    @property
    def p99(self) -> float:
        return float(np.percentile(self.delays_ms, 99)) if self.delays_ms else float("inf")

    @property
    def passed(self) -> bool:
        return self.lost == 0 and self.p99 <= 1000 * FRAME_S and len(self.delays_ms) >= 0.99 * self.frames_expected


async def _connection(
    url: str,
    start: dict,
    frames: list[bytes],
    out_bytes: list[int],
    t0: float,
    run: Run,
    ready: asyncio.Event,
    go: asyncio.Event,
) -> None:
    """One paced connection: frame k goes out at t0 + k * 20 ms; frame k's output is complete once
    `out_bytes[k]` bytes have come back."""
    from websockets.asyncio.client import connect

    loop = asyncio.get_running_loop()
    try:
        async with connect(url, max_size=None, compression=None) as ws:
            await ws.send(json.dumps(start))
            json.loads(await ws.recv())
            ready.set()
            await go.wait()

            async def send() -> None:
                for k, frame in enumerate(frames):
                    await asyncio.sleep(max(0.0, t0 + k * FRAME_S - loop.time()))
                    await ws.send(frame)
                await ws.send('{"type": "end"}')

            sender = asyncio.create_task(send())
            got, k = 0, 0
            async for message in ws:
                if isinstance(message, str):
                    if json.loads(message).get("type") != "end":
                        run.lost += 1
                    break
                got += len(message)
                now = loop.time()
                while k < len(frames) and got >= out_bytes[k]:
                    if k * FRAME_S >= WARMUP_S:
                        run.delays_ms.append(1000 * (now - (t0 + k * FRAME_S)))
                    k += 1
            await sender
    except Exception as exc:  # refused (503) or closed under the client
        print(f"  connection lost: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
        run.lost += 1
        ready.set()


async def measure(base: str, pairs: int, seconds: float, pcm: np.ndarray, codes: np.ndarray, server_pid: int) -> Run:
    """N two-way streams for `seconds`, all connected first, then paced from random phases; the server's CPU
    is counted over the paced part."""
    run = Run(pairs)
    n = int(seconds / FRAME_S)
    ws = base.replace("http", "ws", 1)
    loop = asyncio.get_running_loop()
    go = asyncio.Event()
    start_at = loop.time() + 2.0 + 0.01 * pairs  # time to connect everyone first
    tasks, readies = [], []
    rng = random.Random(pairs)
    stages = codes.shape[1]
    clip = pcm[: len(pcm) - len(pcm) % HOP].reshape(-1, HOP)  # the clip's whole frames
    for i in range(pairs):
        first = (i * 97) % len(clip)  # a different stretch of speech per stream, wrapping round the clip
        pcm_frames = [clip[(first + k) % len(clip)].tobytes() for k in range(n)]
        code_frames = [codes[(first + k) % len(codes)].tobytes() for k in range(n)]
        for path, start, frames, out_bytes in (
            ("/v1/stream/encode", {"type": "start"}, pcm_frames, [2 * stages * (k + 1) for k in range(n)]),
            ("/v1/stream/decode", {"type": "start"}, code_frames, [2 * (HOP * (k + 1) - 240) for k in range(n)]),
        ):
            ready = asyncio.Event()
            readies.append(ready)
            t0 = start_at + rng.uniform(0, FRAME_S)
            tasks.append(asyncio.create_task(_connection(ws + path, start, frames, out_bytes, t0, run, ready, go)))
            run.frames_expected += n - int(WARMUP_S / FRAME_S)
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), timeout=60)
    go.set()
    await asyncio.sleep(max(0.0, start_at - loop.time()))  # the paced part starts
    server_before, steps_before, client_before = _cpu_seconds(server_pid), _step_counters(base), time.process_time()
    paced_from = time.monotonic()
    await asyncio.gather(*tasks)
    wall = time.monotonic() - paced_from
    run.server_cpu = (_cpu_seconds(server_pid) - server_before) / wall
    steps, frames, seconds = (after - before for after, before in zip(_step_counters(base), steps_before))
    run.step_cpu, run.frames_per_step = seconds / wall, frames / max(steps, 1)
    run.client_cpu = (time.process_time() - client_before) / wall
    return run


def _cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _step_counters(base: str) -> tuple[float, float, float]:
    """The server's batched streaming steps so far, both directions: (steps, frames, CPU seconds), from /metrics."""
    names = ("simvq_stream_steps_total", "simvq_stream_step_frames_total", "simvq_stream_step_cpu_seconds_total")
    totals = dict.fromkeys(names, 0.0)
    for line in httpx.get(base + "/metrics").text.splitlines():
        name = line.split("{", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return tuple(totals.values())


def step_pair_ms(model, speech: np.ndarray, core: int, rows: int = 16, steps: int = 50) -> float:
    """A batched encode step and decode step of `rows` streams, alone on `core` with torch on one thread:
    milliseconds, the best of three runs of `steps` (the machine's own speed, for the runs beside it)."""
    import torch

    from codec.batched import StreamBatch

    torch.set_num_threads(1)
    batch = StreamBatch(model, capacity=2 * rows)
    enc, dec = [batch.open() for _ in range(rows)], [batch.open() for _ in range(rows)]
    frames = frames_of(torch.from_numpy(speech), rows, steps, HOP)
    best = float("inf")
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        for _ in range(3):
            start = time.perf_counter()
            for x in frames:
                batch.decode(dec, batch.encode(enc, x))
            best = min(best, (time.perf_counter() - start) / steps)
    finally:  # the clients that follow run on the other cores
        os.sched_setaffinity(0, affinity)
    return 1000 * best


def opus_frame_us(pcm: np.ndarray, frames: int = 2000, repeats: int = 3) -> float | None:
    """libopus encode + decode of one 20 ms 16 kHz mono frame at 6 kbit/s, microseconds (best of `repeats`)."""
    name = ctypes.util.find_library("opus")
    if name is None:
        return None
    lib = ctypes.CDLL(name)
    lib.opus_encoder_create.restype = lib.opus_decoder_create.restype = ctypes.c_void_p
    err = ctypes.c_int()
    enc = ctypes.c_void_p(lib.opus_encoder_create(16000, 1, 2048, ctypes.byref(err)))  # OPUS_APPLICATION_VOIP
    dec = ctypes.c_void_p(lib.opus_decoder_create(16000, 1, ctypes.byref(err)))
    lib.opus_encoder_ctl(enc, 4002, ctypes.c_int(6000))  # OPUS_SET_BITRATE
    packet, out = ctypes.create_string_buffer(4000), np.zeros(HOP, np.int16)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for k in range(frames):
            frame = pcm[(k * HOP) % (len(pcm) - HOP) :][:HOP]
            size = lib.opus_encode(enc, frame.ctypes.data_as(ctypes.c_void_p), HOP, packet, 4000)
            lib.opus_decode(dec, packet, size, out.ctypes.data_as(ctypes.c_void_p), HOP, 0)
        best = min(best, (time.perf_counter() - start) / frames)
    lib.opus_encoder_destroy(enc)
    lib.opus_decoder_destroy(dec)
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", default="20,30,40", help="two-way stream counts to try, ascending (default 20,30,40)")
    p.add_argument("--seconds", type=float, default=8.0, help="paced time per count (default 8)")
    p.add_argument("--server-core", type=int, default=0, help="the core the server is pinned to (default 0)")
    p.add_argument("--model", default=None, help="model id or directory (default: the bundled model)")
    p.add_argument("--keep-going", action="store_true", help="try every count, not only up to the first failure")
    args = p.parse_args(argv)

    speech, rate = sf.read(REPO / "examples" / "speech.wav", dtype="float32")
    assert rate == 16000
    pcm = np.round(np.clip(speech, -1, 1) * 32767).astype("<i2")
    cores = sorted(os.sched_getaffinity(0) - {args.server_core})
    if not cores:
        raise SystemExit("needs a second core for the clients")

    from codec.presets import load_model

    model = load_model(args.model, warn=False).model  # the clients' token frames: the clip's offline codes
    import torch

    with torch.inference_mode():
        codes = model.encode(torch.from_numpy(speech)[None, None])[0].T.numpy().astype("<u2")  # [F, stages]
    opus = opus_frame_us(pcm)
    reference = [step_pair_ms(model, speech, args.server_core)]

    settings = {"SIMVQ_TORCH_THREADS": "1", "SIMVQ_POOL_SIZE": "1", "SIMVQ_MAX_STREAMS": "10000"}
    if args.model:
        settings["SIMVQ_MODELS"] = args.model
    measured = dict(settings, SIMVQ_MAX_STREAMS="")
    proc, base = serve({k: v for k, v in measured.items() if v}, prefix=("taskset", "-c", str(args.server_core)))
    own_cap = httpx.get(base + "/readyz").json()["max_streams"]
    stop_server(proc)

    proc, base = serve(settings, prefix=("taskset", "-c", str(args.server_core)))
    os.sched_setaffinity(0, cores)
    runs = []
    try:
        for pairs in (int(x) for x in args.streams.split(",")):
            time.sleep(2 * LAG_WINDOW_S)  # the last count's lag leaves the window the server admits streams by
            run = asyncio.run(measure(base, pairs, args.seconds, pcm, codes, proc.pid))
            runs.append(run)
            if not run.passed and not args.keep_going:
                break
    finally:
        stop_server(proc)
    reference.append(step_pair_ms(model, speech, args.server_core))

    print(
        f"server: one worker pinned to core {args.server_core}, torch on 1 thread; clients on cores {cores}; "
        f"{args.seconds:g} s per count, the first {WARMUP_S:g} s not counted"
    )
    print(
        "\n| two-way streams | WebSocket streams | frames | p50 ms | p99 ms | max ms | lost | server CPU | "
        "of which model steps | frames a step | client CPU | real time |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        d = np.array(r.delays_ms) if r.delays_ms else np.array([np.inf])
        print(
            f"| {r.pairs} | {2 * r.pairs} | {len(r.delays_ms)} / {r.frames_expected} | {np.percentile(d, 50):.1f} | "
            f"{np.percentile(d, 99):.1f} | {d.max():.1f} | {r.lost} | {100 * r.server_cpu:.0f} % | "
            f"{100 * r.step_cpu:.0f} % | {r.frames_per_step:.1f} | {100 * r.client_cpu:.0f} % | "
            f"{'yes' if r.passed else 'no'} |"
        )
    best = max((r.pairs for r in runs if r.passed), default=0)
    print(
        f"\nstreams per core: {best} two-way real-time 20 ms streams at p99 <= 20 ms "
        f"(the server's own cap, measured at its warm-up: {own_cap} WebSocket streams = {own_cap // 2} two-way)"
    )
    print(
        f"reference: an encode and a decode step of 16 streams, alone on core {args.server_core}, took "
        f"{reference[0]:.1f} ms before the runs and {reference[1]:.1f} ms after"
    )
    if opus is not None:
        print(
            f"Opus 6 kbit/s on this machine: {opus:.0f} us to encode and decode one 20 ms frame, "
            f"{1e6 * FRAME_S / opus:.0f} two-way streams per core in codec time alone"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
