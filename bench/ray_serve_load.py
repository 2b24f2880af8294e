"""Ray Serve load script (a benchmark, not a test): 5-second clips through the Ray Serve app, with and without
dynamic batching, encode and decode, for a bounded time each.

It starts a local Ray instance (`--num-cpus`, default 2) and Serve on a free loopback port, deploys the app
once with batching and once without (one replica, one after the other), and drives each with `--clients`
concurrent clients for `--seconds` per operation (the client loop of bench/load_server.py). It prints req/s,
p50/p99 latency of the successful requests, status counts, and the batch sizes the replica reported.

    python bench/ray_serve_load.py                     # bundled model, 8 clients, 10 s per phase
    python bench/ray_serve_load.py --clients 16 --seconds 20 --batch-seconds 40
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

_spec = importlib.util.spec_from_file_location("load_server", REPO / "bench" / "load_server.py")
load_server = sys.modules["load_server"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load_server)  # its clip() and client loop, shared with the plain-server benchmark


def batch_stats(metrics: str, op: str) -> tuple[float, float]:
    """(model calls, clips) the replica's batcher counted for `op` (zero without batching)."""

    def value(name: str) -> float:
        m = re.search(rf'^{name}{{op="{op}"}} ([0-9.e+]+)$', metrics, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    return value("simvq_batch_clips_count"), value("simvq_batch_clips_sum")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model id or directory (default: the bundled model)")
    p.add_argument("--clip-seconds", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each phase")
    p.add_argument("--ops", default="encode,decode")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--batch-seconds", type=float, default=40.0, help="padded audio per batch")
    p.add_argument("--batch-wait-s", type=float, default=0.02)
    p.add_argument("--json", action="store_true", help="print the results as JSON lines too")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from codec.presets import DEFAULT_MODEL_ID
    from server.ray_serve import RayOptions, build
    from server.settings import Settings

    wav = load_server.clip(args.clip_seconds)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    port = load_server._free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        # every variant uses all the cores: batched calls one at a time with N torch threads, or N at once with
        # one thread each; unbatched, the app's own pool of one-thread jobs, one per core (as `simvq-codec serve`)
        n = args.num_cpus
        variants = [(True, 1, n), (True, n, 1), (False, 1, 1)]
        for batching, workers, threads in variants:
            settings = Settings(
                models=[args.model or DEFAULT_MODEL_ID],
                torch_threads=threads,
                max_duration_s=max(300.0, args.clip_seconds),
            )
            options = RayOptions(
                name="bench",
                batching=batching,
                batch_seconds=args.batch_seconds,
                batch_wait_s=args.batch_wait_s,
                max_ongoing_requests=args.clients,
                max_queued_requests=-1,
                num_cpus=n,
                model_workers=workers,
            )
            label = f"{workers} x {threads} thread(s)" if batching else f"pool of {n} x 1 thread"
            t0 = time.perf_counter()
            serve.run(build(settings, options), name="bench", route_prefix="/")
            print(f"# batching={batching} ({label}): deployed in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            tok = httpx.post(url + "/encode", content=wav, headers={"content-type": "audio/wav"}, timeout=120).content
            for op in args.ops.split(","):
                before = batch_stats(httpx.get(url + "/metrics").text, op)
                result = asyncio.run(load_server.run_phase(url, op, args.clients, args.seconds, wav, tok, None))
                after = batch_stats(httpx.get(url + "/metrics").text, op)
                calls, clips = after[0] - before[0], after[1] - before[1]
                row = {
                    "op": op,
                    "batching": batching,
                    "model_calls": label,
                    "clients": args.clients,
                    "rps": result.rps_ok,
                    "audio_x_realtime": round(result.rps_ok * args.clip_seconds, 1),
                    "p50_ms": result.p50_ms,
                    "p99_ms": result.p99_ms,
                    "ok": result.ok,
                    "503": result.rejected_503,
                    "other_errors": result.other_errors,
                    "mean_batch": round(clips / calls, 2) if calls else None,
                }
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()

    print(
        f"\n{args.clip_seconds:g} s clips, {args.clients} clients, {args.seconds:g} s per phase, "
        f"Ray num_cpus={args.num_cpus}, one replica, batch budget {args.batch_seconds:g} s padded\n"
    )
    print(
        "| op | batching | model calls at once | req/s | audio x real time | p50 ms | p99 ms | ok | 503 | "
        "other errors | mean clips per model call |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['op']} | {'yes' if r['batching'] else 'no'} | {r['model_calls']} | {r['rps']} | "
            f"{r['audio_x_realtime']} | "
            f"{r['p50_ms']} | {r['p99_ms']} | {r['ok']} | {r['503']} | {r['other_errors']} | "
            f"{r['mean_batch'] if r['mean_batch'] is not None else '-'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
