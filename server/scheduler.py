"""One scheduler per worker: the next frame of every live stream in one batched model step.

The WebSocket handlers (server.routers.stream) cut what arrives into whole frames and queue them on their
`Stream`; the scheduler takes the next frame of every stream that has one and runs all encode frames of a
model as one `codec.batched.StreamBatch` step, then all its decode frames as another, handing each stream its
output after each step. A step never waits for a stream: one that joins is in the next step, one that leaves
simply has no frame, and a client that reads slowly only fills its own outbox. A stream's output is bit for
bit what it would get alone (`codec.batched`).

The steps run on the event loop itself, as one task, and between two steps the loop does its own work: it
reads the frames that arrived during the step and sends the outputs. On a thread of their own, the steps and
the loop handed the core and the GIL to each other at every tensor operation: with 30 two-way streams on one
core, an encode and a decode step of 18 streams each took 12.1 ms beside the WebSocket traffic, against 9.3 ms
on the loop and 7 ms alone (docs/service.md, "Capacity"). A step holds the loop for a few milliseconds: HTTP
requests wait that long at most, and their codec work runs in the worker pool.

Each frame carries the time real time wants its output by (`due`: when it arrived, or later for a client
sending ahead of real time). A stream whose output falls `max_lag_s` behind that, because the worker is
overloaded or because its client does not read, is failed with `behind-real-time` (close 1013), never
served late in silence.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from codec.audio import to_pcm16
from codec.batched import StreamBatch
from codec.model import CodecStream
from server.metrics import Metrics

log = logging.getLogger("server")

END = object()
"""Queued after a stream's last frame: the scheduler answers it in order, after the last frame's output."""

STEP_BUDGET = 0.5
"""Share of a frame's duration that a batched encode step and decode step of a full worker may take together
(`measure_capacity`); the rest is for the WebSocket traffic and jitter. Set so that the cap a worker measures
agreed with what bench/streams_per_core.py found it carries at p99 <= 20 ms on the development machine
(docs/service.md, "Capacity")."""


LOOP_PASSES = 4
"""Event-loop passes between two steps. The first runs the callbacks of the data that arrived during the step,
which wake the handlers; the next run the handlers, which queue its frames, and the pumps, which send the
outputs the step delivered. With one pass, the next step started before the frames that arrived were queued,
and a frame waited about two steps."""

BEHIND_S = 0.02
"""How late a worker's outputs may come before it takes no new stream (`Scheduler.lag_s`): one frame. The cap
measured at the warm-up describes the machine as it was then; a machine that slows down later (other work,
other tenants) would otherwise take streams until all of them fell behind together."""

LAG_WINDOW_S = 1.0
"""The seconds of steps `Scheduler.lag_s` looks back over."""

CLOSE_INTERNAL, CLOSE_TRY_LATER = 1011, 1013  # WebSocket close codes (RFC 6455 section 7.4.1)


class StreamFailed(Exception):
    """A stream's failure that the scheduler found: the close code, reason and detail its client gets."""

    def __init__(self, code: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.reason, self.detail = code, reason, detail


@dataclass(eq=False)
class Stream:
    """One WebSocket stream's place in the scheduler: its slot, its frames in and its outputs out.

    Frames are queued by its handler (`submit`) and taken one per step; outputs (`bytes`, then `END`) come
    back to `outbox`, which its handler sends.
    """

    direction: Literal["encode", "decode"]
    batch: StreamBatch
    stages: int
    frame_s: float
    task: asyncio.Task | None = None  # the handler, cancelled when the stream fails
    slot: int = -1  # its row in `batch` (set at the stream's first step)
    queue: deque = field(default_factory=deque)  # (frame, due) or END
    outbox: deque = field(default_factory=deque)  # bytes, then END
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # outbox has something
    drained: asyncio.Event = field(default_factory=asyncio.Event)  # queue below its bound
    error: StreamFailed | None = None
    closed: bool = False
    _start: float | None = None
    _queued: int = 0

    def __post_init__(self) -> None:
        self.drained.set()

    def due(self, arrival: float) -> float:
        """The due time of the next frame, which arrived at `arrival`: real time wants frame k of a stream
        by its first frame's arrival plus k frames, and never before the frame itself arrived."""
        if self._start is None:
            self._start = arrival
        due = max(arrival, self._start + self._queued * self.frame_s)
        self._queued += 1
        return due

    def fail(self, error: StreamFailed) -> None:
        if self.error is None and not self.closed:
            self.error = error
            if self.task is not None:
                self.task.cancel()


class Scheduler:
    """The worker's stream scheduler: `open` streams, `submit` their frames, read their `outbox`; `close`."""

    def __init__(self, max_lag_s: float, metrics: Metrics | None = None, max_queued: int = 250) -> None:
        """On the running event loop, whose task it starts; `metrics` counts the steps."""
        self.max_lag_s, self.metrics, self.max_queued = max_lag_s, metrics, max_queued
        self._batches: dict[int, StreamBatch] = {}
        self._groups: dict[tuple[int, str], list[Stream]] = {}
        self._closed: deque[Stream] = deque()  # their slots are freed between steps
        self._lags: deque[tuple[float, float]] = deque()  # (when, the latest output of a step), the last second
        self._work = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="simvq-streams")
        self._task.add_done_callback(_log_failure)

    def open(self, model: torch.nn.Module, direction: Literal["encode", "decode"], stages: int) -> Stream:
        """A new stream of `model` (its next step includes it); its handler is the current task."""
        batch = self._batches.get(id(model))
        if batch is None:
            batch = self._batches[id(model)] = StreamBatch(model)
        stream = Stream(direction, batch, stages, model.hop_length / model.sample_rate, task=asyncio.current_task())
        self._groups.setdefault((id(model), direction), []).append(stream)
        return stream

    def close(self, stream: Stream) -> None:
        """Drop a stream (at once; its slot is freed before the next step)."""
        stream.closed = True
        for group in self._groups.values():
            if stream in group:
                group.remove(stream)
        self._closed.append(stream)

    def submit(self, stream: Stream, frames: np.ndarray, end: bool = False) -> None:
        """Queue whole frames (`[n, hop]` float32 audio or `[n, stages]` int64 codes) that arrived now, and
        after them the end of the stream if `end`."""
        now = time.monotonic()
        for frame in frames:
            stream.queue.append((frame, stream.due(now)))
        if end:
            stream.queue.append(END)
        if len(stream.queue) > self.max_queued:
            stream.drained.clear()  # the handler stops reading until the scheduler catches up
        self._work.set()

    def stop(self) -> None:
        self._task.cancel()

    def lag_s(self) -> float:
        """How far behind real time the worker runs: of the steps of the last `LAG_WINDOW_S`, the median of
        each one's latest output (0 when idle). A stream joins when this is at most `BEHIND_S`."""
        self._forget_lags(time.monotonic())
        return float(np.median([lag for _, lag in self._lags])) if self._lags else 0.0

    def _forget_lags(self, now: float) -> None:
        """Drop the lags older than `LAG_WINDOW_S` (here as well as when one is recorded, so that a worker no
        handshake asks keeps one window of them, not every step's)."""
        while self._lags and self._lags[0][0] < now - LAG_WINDOW_S:
            self._lags.popleft()

    async def _run(self) -> None:
        """Steps while any stream has a frame, each model and direction in turn, the loop's work between them."""
        while True:
            await self._work.wait()
            self._work.clear()
            busy = True
            while busy:
                busy = False
                for key in list(self._groups):
                    if self._step_group(key):
                        busy = True
                        for _ in range(LOOP_PASSES):
                            await asyncio.sleep(0)

    def _step_group(self, key: tuple[int, str]) -> bool:
        """One batched step over the streams of a model and direction that have a frame: whether any had."""
        while self._closed:
            stream = self._closed.popleft()
            if stream.slot >= 0:
                stream.batch.close(stream.slot)
        heads = [(s, s.queue.popleft()) for s in self._groups.get(key, ()) if s.queue]
        if not heads:
            return False
        direction, start = key[1], time.thread_time()
        try:
            with torch.no_grad():
                done = self._step(direction, heads)
        except Exception:
            log.exception("a batched %s step failed", direction)
            detail = "the server failed on this stream; it has been logged"
            error = StreamFailed(CLOSE_INTERNAL, "internal-error", detail)
            for stream, _ in heads:
                stream.fail(error)
            return True
        if self.metrics is not None:
            self.metrics.stream_steps.labels(direction=direction).inc()
            frames = sum(item is not END for _, item in heads)
            self.metrics.stream_step_frames.labels(direction=direction).inc(frames)
            self.metrics.stream_step_seconds.labels(direction=direction).inc(time.thread_time() - start)
        self._deliver(done)
        return True

    def _step(self, direction: str, heads: list[tuple[Stream, Any]]) -> list[tuple[Stream, Any, float | None]]:
        """Run one step: (stream, bytes or END, due; None for what follows the end) for each head, in order."""
        rows = [(s, item) for s, item in heads if item is not END]
        out: dict[int, tuple[bytes, float]] = {}
        for s, _ in heads:
            if s.slot < 0:
                s.slot = s.batch.open()
        if rows:
            streams = [s for s, _ in rows]
            batch, slots = streams[0].batch, [s.slot for s in streams]
            if direction == "encode":
                frames = torch.from_numpy(np.stack([frame for _, (frame, _) in rows]))
                codes = batch.encode(slots, frames, max(s.stages for s in streams)).cpu().numpy()
                payloads = [codes[b, : s.stages].astype("<u2").tobytes() for b, s in enumerate(streams)]
            else:
                width = max(s.stages for s in streams)
                codes = np.zeros((len(rows), width), np.int64)
                for b, (s, (frame, _)) in enumerate(rows):
                    codes[b, : s.stages] = frame
                audio = [a.cpu() for a in batch.decode(slots, torch.from_numpy(codes), [s.stages for s in streams])]
                hop = streams[0].batch.model.hop_length
                pcm = to_pcm16(torch.stack([a if a.shape[0] == hop else a.new_zeros(hop) for a in audio]).numpy())[0]
                payloads = [
                    row.tobytes() if a.shape[0] == hop else to_pcm16(a.numpy())[0].tobytes()
                    for row, a in zip(pcm, audio)
                ]  # a stream's first frame is short
            out = {id(s): (p, due) for (s, (_, due)), p in zip(rows, payloads)}
        done = []
        for s, item in heads:
            if item is END:
                if direction == "decode":  # the decoder's last samples
                    tail = CodecStream(s.batch.model, s.batch.state(s.slot)).flush_decoder().cpu()
                    if tail.shape[-1]:
                        done.append((s, to_pcm16(tail.reshape(-1).numpy())[0].tobytes(), None))
                done.append((s, END, None))
            else:
                done.append((s, *out[id(s)]))
        return done

    def _deliver(self, done: list[tuple[Stream, Any, float | None]]) -> None:
        now = time.monotonic()
        self._forget_lags(now)
        self._lags.append((now, max((now - due for _, _, due in done if due is not None), default=0.0)))
        for stream, payload, due in done:
            if stream.closed or stream.error is not None:
                continue
            lag = 0.0 if due is None else now - due
            if lag > self.max_lag_s or len(stream.outbox) * stream.frame_s > self.max_lag_s:
                late = max(lag, len(stream.outbox) * stream.frame_s)
                stream.fail(
                    StreamFailed(
                        CLOSE_TRY_LATER,
                        "behind-real-time",
                        f"this stream's output fell {late * 1000:.0f} ms behind real time (the limit is "
                        f"{self.max_lag_s * 1000:.0f} ms): the server is overloaded or the client reads too slowly; "
                        "reconnect, later or to another instance",
                    )
                )
                continue
            stream.outbox.append(payload)
            stream.ready.set()
            if len(stream.queue) <= self.max_queued // 2:
                stream.drained.set()


async def pump(stream: Stream, send: Callable[[bytes], Any]) -> int:
    """Send a stream's outputs as they come, those that wait joined into one message, until its END: the
    bytes sent."""
    sent = 0
    while True:
        await stream.ready.wait()
        stream.ready.clear()
        items = list(stream.outbox)
        stream.outbox.clear()
        end = items and items[-1] is END
        data = b"".join(items[:-1] if end else items)
        if data:
            await send(data)
            sent += len(data)
        if end:
            return sent


def measure_capacity(
    model: torch.nn.Module, budget: float = STEP_BUDGET, probe: tuple[int, int] = (8, 48), repeats: int = 5
) -> tuple[int, float]:
    """The WebSocket streams one worker carries in real time with `model`: the largest even N such that a
    batched encode step of N/2 frames and a decode step of N/2 frames take at most `budget` of a frame.

    The two steps are timed at the two `probe` sizes (their CPU time, the best of `repeats`) and the cost
    taken as linear in between and beyond; N is at least 2. Returns (N, milliseconds of the two steps at N/2
    frames each)."""
    batch = StreamBatch(model)
    hop, frame_ms = model.hop_length, 1000 * model.hop_length / model.sample_rate
    generator = torch.Generator().manual_seed(0)

    def step_ms(rows: int) -> float:
        enc = [batch.open() for _ in range(rows)]
        dec = [batch.open() for _ in range(rows)]
        times = []
        for i in range(repeats + 2):
            frames = 0.1 * torch.randn(rows, hop, generator=generator)
            start = time.thread_time()  # the core's time, not another process's turns on it
            codes = batch.encode(enc, frames)
            batch.decode(dec, codes)
            if i >= 2:  # the first steps pay for allocation
                times.append(time.thread_time() - start)
        return 1000 * min(times)

    small, large = probe
    t_small, t_large = step_ms(small), step_ms(large)
    per_row = max((t_large - t_small) / (large - small), 1e-6)
    rows = max(1, int((budget * frame_ms - (t_small - per_row * small)) / per_row))
    return 2 * rows, t_small + per_row * (rows - small)


def _log_failure(task: asyncio.Task) -> None:
    """The scheduler's task ended other than by `stop`: no stream would be served again, so say why."""
    if not task.cancelled() and task.exception() is not None:
        log.error("the stream scheduler stopped", exc_info=task.exception())
