"""Ray Serve: the app of `server.app.create_app` behind `@serve.ingress`, with replicas, autoscaling, a queue
limit (503) and dynamic batching of encode and decode budgeted by padded audio seconds.

    serve run server.ray_serve:app                          # local Ray, SIMVQ_* and SIMVQ_RAY_* from the env
    serve run server.ray_serve:build_app replicas=0 max_replicas=4 batch_seconds=30
    simvq-codec serve --ray                                 # the same, started and stopped by the CLI

Each replica loads the models once and builds the same FastAPI app as `simvq-codec serve`, so routes, limits,
errors and metrics are identical, and it serves the plain `SimVQCodec`. The app is given a `Batcher` as its
`ServedModel.batcher`: an offline encode or decode of one clip (what `POST /encode` and `POST /decode` do in
their worker thread, through `ServedModel.encode`/`decode`) is queued to a `@serve.batch` method, whose
`batch_size_fn` measures a batch in padded audio (clips x longest clip, what the model actually computes): a
batch closes when the next clip would take it past `batch_seconds`, or after `batch_wait_s`. `serve.batch`
forms the next batch as soon as the previous one is handed over, so while the model is busy its batches would
stay as small as the arrivals within `batch_wait_s`; here they go to a model queue instead, and each time a
model worker is free (`model_workers` per replica) it takes the oldest clip and the later ones of the same
operation that fit the budget. So batches grow with the load and never pass the budget. The clips are
right-padded with zeros and cut back after one forward pass; the codec is causal, so every clip gets exactly
the tokens and samples it gets alone. WebSocket streams run on the same model, each with its own streaming
state (`model.stream()`), and never reach the batcher.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import Histogram
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from ray import serve

from codec.pretrained import Pretrained
from codec.batching import decode_padded, encode_padded
from server.app import create_app
from server.settings import Settings

log = logging.getLogger("server.ray")

_CLIP_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
_SECONDS_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300)


class RayOptions(BaseSettings):
    """How the application is deployed; each field is `SIMVQ_RAY_<NAME>` or a `serve run ... key=value` argument."""

    model_config = SettingsConfigDict(env_prefix="SIMVQ_RAY_", extra="forbid", validate_default=True)

    name: str = Field("simvq-codec", description="Application and deployment name.")
    route_prefix: str = Field("/", description="HTTP path the app is mounted at.")
    replicas: int = Field(1, ge=0, le=1000, description="Fixed replica count; 0 turns on autoscaling.")
    min_replicas: int = Field(1, ge=0, le=1000, description="Autoscaling: fewest replicas.")
    max_replicas: int = Field(4, ge=1, le=1000, description="Autoscaling: most replicas.")
    target_ongoing_requests: float = Field(4.0, gt=0, description="Autoscaling: requests per replica to aim at.")
    max_ongoing_requests: int = Field(
        8, ge=1, le=10_000, description="Requests one replica works on at once (its app admits as many)."
    )
    max_queued_requests: int = Field(
        64, ge=-1, description="Requests waiting for a replica, per caller; beyond it 503 (-1: no limit)."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; above 0 the model runs on cuda.")
    batching: bool = Field(True, description="Batch offline encode/decode calls across requests.")
    batch_seconds: float = Field(
        60.0, gt=0, le=3600, description="Padded audio per batch: clips x longest clip, in seconds."
    )
    batch_wait_s: float = Field(0.01, ge=0, le=10, description="How long a batch waits to fill after its first clip.")
    model_workers: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Batches run at once per replica; default: 1 on a GPU, num_cpus / SIMVQ_TORCH_THREADS on a CPU.",
    )

    def resolved_model_workers(self, settings: Settings) -> int:
        if self.model_workers is not None:
            return self.model_workers
        if not settings.device.startswith("cpu"):
            return 1
        return max(1, int(self.num_cpus // settings.torch_threads))


# --- batching ----------------------------------------------------------------------------------------
@dataclass
class Job:
    """One offline model call waiting for a batch.

    op: "encode" (payload: audio `[T]`) or "decode" (payload: codes `[S, F]`).
    model: the SimVQCodec to run. n_stages: stages to encode (None for decode).
    ms: audio duration in milliseconds (the unit of the batch budget).
    """

    op: str
    model: Any
    payload: torch.Tensor
    n_stages: int | None
    ms: int


def padded_ms(jobs: list[Job]) -> int:
    """Size of a batch for the budget: what the model computes once the clips are padded to the longest."""
    return len(jobs) * max(job.ms for job in jobs)


def run_jobs(jobs: list[Job]) -> list[Any]:
    """Run a batch: one padded forward pass per (model, stages) group; a group's error goes to its jobs."""
    results: list[Any] = [None] * len(jobs)
    groups: dict[tuple[str, int, int | None], list[int]] = {}
    for i, job in enumerate(jobs):
        key = (job.op, id(job.model), job.n_stages if job.op == "encode" else int(job.payload.shape[0]))
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        model = jobs[members[0]].model
        payloads = [jobs[i].payload for i in members]
        try:
            if jobs[members[0]].op == "encode":
                outs = encode_padded(model, payloads, jobs[members[0]].n_stages)
            else:
                outs = decode_padded(model, payloads)
        except Exception as exc:  # noqa: BLE001 - handed to each caller, which raises it in its request
            outs = [exc] * len(members)
        for i, out in zip(members, outs):
            results[i] = out
    return results


def take_batch(pending: list[Job], budget_ms: int) -> list[int]:
    """Indices of the jobs of the next model call: the oldest job, then later jobs of the same operation in
    arrival order while the padded size stays within `budget_ms` (a job longer than the budget goes alone)."""
    head = pending[0]
    chosen, longest = [0], head.ms
    for i in range(1, len(pending)):
        job = pending[i]
        if job.op != head.op:
            continue
        if (len(chosen) + 1) * max(longest, job.ms) > budget_ms:
            break
        chosen.append(i)
        longest = max(longest, job.ms)
    return chosen


class _DropBatchSizeWarning(logging.Filter):
    """Ray warns when max_batch_size exceeds max_ongoing_requests; our batch size is milliseconds, not clips."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("`max_batch_size`")


class Batcher:
    """The bridge from the app's worker threads to the replica's `@serve.batch` queues: the app's
    `ServedModel.batcher` (`server.runtime.ClipBatcher`), so an offline encode/decode of one clip comes here.

    loop: the replica's event loop (where the batch queues live).
    submit: `{"encode": coroutine fn, "decode": coroutine fn}` taking one `Job` (the `@serve.batch` methods).
    alone: coroutine fn running a list of jobs as one batch now (for a clip longer than the budget).
    budget_ms: padded milliseconds per batch.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, submit: dict[str, Any], alone: Any, budget_ms: int) -> None:
        self.loop, self.submit, self.alone, self.budget_ms = loop, submit, alone, budget_ms

    def encode(self, model: Any, wav: torch.Tensor, n_stages: int) -> torch.Tensor:
        """Audio `[T]` -> codes `[S, F]`, in a batch."""
        ms = max(1, round(1000 * wav.shape[-1] / model.sample_rate))
        return self(Job("encode", model, wav, n_stages, ms))

    def decode(self, model: Any, codes: torch.Tensor) -> torch.Tensor:
        """Codes `[S, F]` -> audio `[1, F * hop]`, in a batch."""
        ms = max(1, round(1000 * codes.shape[-1] * model.hop_length / model.sample_rate))
        return self(Job("decode", model, codes, None, ms))

    def __call__(self, job: Job) -> Any:
        """Block the calling worker thread until the job's batch has run; return its output or raise its error."""
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop:  # never block the event loop: run unbatched
            result = run_jobs([job])[0]
        elif job.ms > self.budget_ms:  # `serve.batch` refuses an item above its budget: a batch of its own
            result = asyncio.run_coroutine_threadsafe(self.alone([job]), self.loop).result()[0]
        else:
            result = asyncio.run_coroutine_threadsafe(self.submit[job.op](job), self.loop).result()
        if isinstance(result, BaseException):
            raise result
        return result


# --- the deployment ----------------------------------------------------------------------------------
@serve.deployment(name="simvq-codec")
@serve.ingress()
class CodecService:
    """One replica: the models, the batch queues, the model queue and the service's FastAPI app.

    settings: `Settings` fields (the driver's SIMVQ_* environment, adjusted by `build`).
    options: `RayOptions` fields.
    """

    async def __init__(self, settings: dict[str, Any], options: dict[str, Any]) -> None:
        from codec.presets import load_model
        from server.runtime import served_id

        self.settings = Settings(**settings)
        self.options = RayOptions(**options)
        torch.set_num_threads(self.settings.torch_threads)
        self.model_workers = self.options.resolved_model_workers(self.settings)
        self.executor = ThreadPoolExecutor(self.model_workers, thread_name_prefix="simvq-batch")
        loop = asyncio.get_running_loop()
        self.batcher: Batcher | None = None
        models: dict[str, Pretrained] = {}
        for ref in self.settings.models:
            release = await loop.run_in_executor(
                self.executor, lambda r=ref: load_model(r, self.settings.device, False)
            )
            models[served_id(ref, release)] = release
        if self.options.batching:
            budget_ms = int(self.options.batch_seconds * 1000)
            for method in (self.encode_batch, self.decode_batch):
                method.set_max_batch_size(budget_ms)
                method.set_batch_wait_timeout_s(self.options.batch_wait_s)
            logging.getLogger("ray.serve").addFilter(_DropBatchSizeWarning())
            self.batcher = Batcher(
                loop, {"encode": self.encode_batch, "decode": self.decode_batch}, self._run_batch, budget_ms
            )
        self.models = models
        self._metrics: dict[str, Histogram] = {}
        self._pending: list[tuple[Job, asyncio.Future]] = []  # the model queue, oldest first
        self._runners = 0  # model calls in progress (at most self.model_workers)

    def __serve_build_asgi_app__(self) -> Any:
        app = create_app(self.settings, models=self.models, batcher=self.batcher)
        registry = app.state.metrics.registry
        self._metrics = {
            "clips": Histogram(
                "simvq_batch_clips",
                "Clips per model call of the Ray Serve batcher.",
                ["op"],
                buckets=_CLIP_BUCKETS,
                registry=registry,
            ),
            "seconds": Histogram(
                "simvq_batch_padded_seconds",
                "Padded audio seconds per batched model call.",
                ["op"],
                buckets=sorted({*_SECONDS_BUCKETS, self.options.batch_seconds}),
                registry=registry,
            ),
        }
        return app

    async def _run_batch(self, jobs: list[Job]) -> list[Any]:
        """Queue `jobs` for the model and wait for their results (or the exceptions to raise)."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in jobs]
        self._pending.extend(zip(jobs, futures))
        if self._runners < self.model_workers:
            self._runners += 1
            loop.create_task(self._drive_model())
        return list(await asyncio.gather(*futures))

    async def _drive_model(self) -> None:
        """While clips wait: take the next batch within the budget, run it in a model thread, hand out results."""
        loop = asyncio.get_running_loop()
        budget_ms = int(self.options.batch_seconds * 1000)
        try:
            while self._pending:
                chosen = take_batch([job for job, _ in self._pending], budget_ms)
                taken = [self._pending[i] for i in chosen]
                for i in reversed(chosen):
                    del self._pending[i]
                jobs = [job for job, _ in taken]
                if self._metrics:
                    self._metrics["clips"].labels(op=jobs[0].op).observe(len(jobs))
                    self._metrics["seconds"].labels(op=jobs[0].op).observe(padded_ms(jobs) / 1000)
                try:
                    results = await loop.run_in_executor(self.executor, run_jobs, jobs)
                except Exception as exc:  # noqa: BLE001 - e.g. the executor shut down: every caller hears of it
                    results = [exc] * len(jobs)
                for (_, future), result in zip(taken, results):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._runners -= 1

    # `serve.batch` measures batches in padded milliseconds (set from the options in __init__); its own
    # concurrency limit is left high because the model queue above bounds the model calls (model_workers).
    @serve.batch(max_batch_size=60_000, batch_wait_timeout_s=0.01, max_concurrent_batches=1000, batch_size_fn=padded_ms)
    async def encode_batch(self, jobs: list[Job]) -> list[Any]:
        return await self._run_batch(jobs)

    @serve.batch(max_batch_size=60_000, batch_wait_timeout_s=0.01, max_concurrent_batches=1000, batch_size_fn=padded_ms)
    async def decode_batch(self, jobs: list[Job]) -> list[Any]:
        return await self._run_batch(jobs)

    def check_health(self) -> None:
        """Ray restarts a replica whose models failed to load (the app's /healthz answers 503 then too)."""
        runtime = getattr(self.app.state, "runtime", None)
        if runtime is not None and runtime.phase.value == "failed":
            raise RuntimeError(f"model loading failed: {runtime.failure}")


# --- building and running ----------------------------------------------------------------------------
def build(settings: Settings | None = None, options: RayOptions | None = None) -> Any:
    """The bound Ray Serve application for `serve.run` (settings default to SIMVQ_*, options to SIMVQ_RAY_*)."""
    settings = settings or Settings()
    options = options or RayOptions()
    changes: dict[str, Any] = {
        "load_in_background": False,  # a replica takes traffic only once its model is loaded and warmed up
        "max_concurrency": options.max_ongoing_requests,  # Ray queues the rest; the app never refuses them
    }
    if options.batching:  # worker threads mostly wait for their batch: one per request in flight
        changes["pool_size"] = min(256, options.max_ongoing_requests + 2)
    if options.num_gpus > 0 and settings.device == "cpu":
        changes["device"] = "cuda"
    settings = settings.model_copy(update=changes)
    deployment_options: dict[str, Any] = dict(
        name=options.name,
        max_ongoing_requests=options.max_ongoing_requests,
        max_queued_requests=options.max_queued_requests,
        # beyond the queue Ray's proxy answers 503 itself (plain text); with the app's Retry-After delay
        backpressure_config={"status_code": 503, "retry_after_s": settings.retry_after_s},
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        graceful_shutdown_timeout_s=max(1.0, settings.drain_timeout_s),
        health_check_period_s=10,
    )
    if options.replicas == 0:
        deployment_options["num_replicas"] = "auto"
        deployment_options["autoscaling_config"] = {
            "min_replicas": options.min_replicas,
            "max_replicas": max(options.max_replicas, options.min_replicas),
            "target_ongoing_requests": options.target_ongoing_requests,
        }
    else:
        deployment_options["num_replicas"] = options.replicas
    return CodecService.options(**deployment_options).bind(settings.model_dump(mode="json"), options.model_dump())


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for `serve run server.ray_serve:build_app key=value ...` (keys of `RayOptions`)."""
    return build(Settings(), RayOptions(**args))


def __getattr__(name: str) -> Any:
    """`server.ray_serve:app` for `serve run` / `serve deploy`, built from the environment when asked for."""
    if name == "app":
        return build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run(settings: Settings, options: RayOptions, address: str | None = None) -> int:
    """`simvq-codec serve --ray`: start (or join) Ray, deploy, serve on settings.host:port until SIGINT/SIGTERM."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False)
    local = started and not (address or os.environ.get("RAY_ADDRESS"))
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            serve.run(build(settings, options), name=options.name, route_prefix=options.route_prefix)
        except RuntimeError as exc:  # the replicas' tracebacks are in the log above
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"simvq-codec: error: Ray Serve could not deploy the app: {reason}", file=sys.stderr)
            return 2
        print(
            f"simvq-codec: serving on http://{settings.host}:{settings.port}{options.route_prefix} through Ray Serve "
            "(Ctrl-C stops)",
            flush=True,
        )
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            if local:
                serve.shutdown()
            else:
                serve.delete(options.name)
        finally:
            if started:
                ray.shutdown()
    return 0


def options_from_env(**overrides: Any) -> RayOptions:
    """RayOptions from SIMVQ_RAY_* with the non-None `overrides` on top; errors name the variable."""
    try:
        return RayOptions(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ValueError(f"SIMVQ_RAY_{'.'.join(str(x) for x in first['loc']).upper()}: {first['msg']}") from None
