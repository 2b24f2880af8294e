"""The served models, the worker pool that runs torch off the event loop, the stream scheduler, admission slots
and readiness."""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from codec.errors import CodecError
from codec.model import SimVQCodec
from codec.pretrained import Pretrained
from server.errors import ProblemError
from server.metrics import Metrics
from server.scheduler import Scheduler, measure_capacity
from server.settings import Settings

log = logging.getLogger("server")
T = TypeVar("T")

UNMEASURED_STREAMS = 16
"""The stream cap when `max_streams` is not set and there is no warm-up to measure it in."""


class Phase(str, enum.Enum):  # noqa: UP042 - StrEnum needs Python 3.11
    """Lifecycle of the service as /readyz reports it."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"


class ClipBatcher(Protocol):
    """Runs offline calls of one clip batched with other requests' clips (under Ray Serve:
    `server.ray_serve.Batcher`); each call blocks its worker thread until the clip's batch has run."""

    def encode(self, model: SimVQCodec, wav: torch.Tensor, n_stages: int) -> torch.Tensor:
        """Mono audio `[T]` at the model rate -> codes `[S, F]`, as `model.encode` gives for the clip alone."""
        ...

    def decode(self, model: SimVQCodec, codes: torch.Tensor) -> torch.Tensor:
        """Codes `[S, F]` -> audio `[1, F * hop]`, as `model.decode` gives for the clip alone."""
        ...


@dataclass
class ServedModel:
    """One loaded model and the facts /v1/models reports about it.

    model_id: the id clients pass as `model` (preset id, or the id a checkpoint directory's config names).
    pretrained: the model (in eval mode on the configured device) and its identity (`codec.Pretrained`).
    batcher: where offline `encode`/`decode` of one clip go (set by the Ray Serve deployment); None: the
        model directly. Streams use `model.stream()` and never go through it.
    """

    model_id: str
    pretrained: Pretrained
    batcher: ClipBatcher | None = None

    @property
    def model(self) -> SimVQCodec:
        """The SimVQCodec, shared by every request and stream."""
        return self.pretrained.model

    def _batchable(self, x: torch.Tensor) -> bool:
        return (
            self.batcher is not None
            and not self.model.is_streaming
            and x.dim() == 3
            and x.shape[0] == 1
            and x.shape[-1] > 0
        )

    def encode(self, wav: torch.Tensor, n_stages: int | None = None) -> torch.Tensor:
        """Offline encode, `model.encode`'s contract: a clip `[1, 1, T]` -> `[1, S, F]` goes through the
        batcher when there is one (other shapes: the model directly)."""
        if not self._batchable(wav) or wav.shape[1] != 1:
            return self.model.encode(wav, n_stages)
        n = self.model.n_stages if n_stages is None else int(n_stages)
        return self.batcher.encode(self.model, wav[0, 0], n)[None]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Offline decode, `model.decode`'s contract: codes `[1, S, F]` -> `[1, 1, F * hop]` go through the
        batcher when there is one."""
        if not self._batchable(codes):
            return self.model.decode(codes)
        return self.batcher.decode(self.model, codes[0])[None]


class Slots:
    """A non-blocking counter of admitted work (or of bytes): `try_acquire` or refuse at once (the caller
    answers 503)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._busy = 0
        self._lock = threading.Lock()

    @property
    def busy(self) -> int:
        return self._busy

    def try_acquire(self, n: int = 1) -> bool:
        with self._lock:
            if self._busy + n > self.capacity:
                return False
            self._busy += n
            return True

    def release(self, n: int = 1) -> None:
        with self._lock:
            if self._busy < n:
                raise RuntimeError("Slots.release without acquire")
            self._busy -= n


@dataclass
class Slot:
    """One admitted request's hold on `Slots`; released exactly once, when both the request and its
    worker jobs are finished (a 504 does not free capacity a still-running job uses)."""

    slots: Slots
    on_release: Callable[[], None] | None = None
    _holds: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def hold(self) -> None:
        with self._lock:
            self._holds += 1

    def drop(self) -> None:
        with self._lock:
            self._holds -= 1
            last = self._holds == 0
        if last:
            self.slots.release()
            if self.on_release is not None:
                self.on_release()


class Runtime:
    """Everything model-related the routers need, built once per app and loaded in the lifespan."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        models: dict[str, Pretrained] | None = None,
        batcher: ClipBatcher | None = None,
    ) -> None:
        self.settings = settings
        self.batcher = batcher
        self.phase = Phase.LOADING
        self.failure: str | None = None
        self.models: dict[str, ServedModel] = {}
        self.default_model_id: str | None = None
        self._preloaded = models
        self.pool = ThreadPoolExecutor(max_workers=settings.resolved_pool_size(), thread_name_prefix="simvq-work")
        self.slots = Slots(settings.max_concurrency)
        self.stream_slots = Slots(settings.max_streams or UNMEASURED_STREAMS)  # measured in `load` when not set
        self.scheduler = Scheduler(settings.stream_max_lag_s, metrics)
        self.upload_bytes = Slots(settings.max_upload_bytes)  # bodies being received, before a work slot
        self.active = 0  # HTTP requests and streams being served, for draining
        self._idle = asyncio.Event()
        self._idle.set()

    # --- lifecycle ----------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load (or adopt) the models and warm them up; runs in a worker thread. Sets the phase."""
        try:
            torch.set_num_threads(self.settings.torch_threads)
            if self._preloaded is not None:
                loaded = dict(self._preloaded)
            else:
                from codec.presets import load_model

                loaded = {}
                for ref in self.settings.models:
                    release = load_model(ref, device=self.settings.device, warn=False)
                    if not release.trained:
                        log.warning("model %s is UNTRAINED (random weights): its output is noise", ref)
                    loaded[served_id(ref, release)] = release
            for model_id, release in loaded.items():
                release.model.eval()
                served = ServedModel(model_id, release, self.batcher)
                if self.settings.warmup:
                    t0 = time.perf_counter()
                    _warm_up(served)
                    log.info("warmed up %s in %.2f s", model_id, time.perf_counter() - t0)
                self.models[model_id] = served
            self.default_model_id = next(iter(self.models))
            if self.settings.max_streams is None and self.settings.warmup:
                self.stream_slots.capacity = min(self._stream_capacity(served.model) for served in self.models.values())
            # The 200,000 objects of the loaded service (modules, routes, schemas) live as long as the process: the
            # garbage collector need not scan them again. A full collection of them stopped the event loop, and
            # with it every live stream, for 100 ms.
            gc.collect()
            gc.freeze()
            self.phase = Phase.READY
        except Exception as exc:  # surfaced by /readyz and /healthz; the process stays up to report it
            log.exception("model loading failed")
            # a model the settings name wrongly is said as the CLI says it; anything else by its kind
            self.failure = str(exc) if isinstance(exc, CodecError) else f"{type(exc).__name__}: {exc}"
            self.phase = Phase.FAILED

    def _stream_capacity(self, model: SimVQCodec) -> int:
        streams, step_ms = measure_capacity(model)
        log.info(
            "stream capacity of %s: %d streams (a batched step of %d encode and %d decode frames: %.1f ms)",
            type(model).__name__,
            streams,
            streams // 2,
            streams // 2,
            step_ms,
        )
        return streams

    async def drain(self, timeout: float) -> bool:
        """Refuse new work, wait up to `timeout` s for requests and streams in flight; True if all finished."""
        self.phase = Phase.DRAINING
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def close(self) -> None:
        self.scheduler.stop()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def enter(self) -> None:
        self.active += 1
        self._idle.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    # --- request helpers ----------------------------------------------------------------------------------
    def require_ready(self) -> None:
        """503 unless the models are loaded and warmed up and the server is not draining."""
        if self.phase is Phase.READY:
            return
        retry = str(max(1, self.settings.retry_after_s))
        if self.phase is Phase.LOADING:
            raise ProblemError(
                503,
                "loading",
                "Model loading",
                "the model is still loading; retry shortly",
                headers={"Retry-After": retry},
            )
        if self.phase is Phase.DRAINING:
            raise ProblemError(
                503,
                "draining",
                "Shutting down",
                "this server is shutting down; retry on another instance",
                headers={"Retry-After": retry},
            )
        raise ProblemError(503, "model-failed", "Model unavailable", "the model failed to load on this server")

    def get(self, model_id: str | None) -> ServedModel:
        """The served model for `model_id` (None: the default); 422 naming the served ids otherwise."""
        self.require_ready()
        key = model_id or self.default_model_id
        if key not in self.models:
            served = ", ".join(self.models)
            raise ProblemError(
                422,
                "unknown-model",
                "Unknown model",
                f"model '{model_id}' is not served here; use one of: {served} (GET /v1/models)",
            )
        return self.models[key]

    def admit(self, on_release: Callable[[], None] | None = None) -> Slot:
        """Take a work slot or raise 503 with Retry-After at once."""
        if not self.slots.try_acquire():
            raise ProblemError(
                503,
                "overloaded",
                "Server busy",
                f"all {self.slots.capacity} work slots are busy; retry after the Retry-After delay",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        return Slot(self.slots, on_release)

    async def run(self, slot: Slot | None, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in the worker pool under inference mode; the slot stays held until it finishes."""

        def job() -> T:
            with torch.inference_mode():
                return fn(*args)

        if slot is not None:
            slot.hold()
        try:
            future: Future[T] = self.pool.submit(job)
        except RuntimeError:  # pool shut down
            if slot is not None:
                slot.drop()
            raise ProblemError(
                503,
                "draining",
                "Shutting down",
                "this server is shutting down; retry elsewhere",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            ) from None
        if slot is not None:
            future.add_done_callback(lambda _f: slot.drop())
        return await asyncio.wrap_future(future)


def served_id(ref: str, release: Pretrained) -> str:
    """A preset id stays as given; a checkpoint directory is served under the id its config names."""
    from codec.presets import MODELS

    return ref if ref in MODELS else release.model_id


def _warm_up(served: ServedModel) -> None:
    """One offline encode/decode (through the batcher, if any) and one streaming step, so the first request
    pays no lazy-init cost."""
    model = served.model
    hop = int(model.hop_length)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    wav = torch.zeros(1, 1, hop * 10, device=device)
    with torch.inference_mode():
        codes = served.encode(wav)
        served.decode(codes)
        model.stream(1).encode(wav[..., : hop + 1])
