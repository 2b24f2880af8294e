"""Slow senders beside normal clients (a benchmark, not a test): do trickling uploads cost the model?

Starts `python -m server serve` on a free loopback port (or targets `--url`) and runs two phases of
`--seconds` each: normal clients alone, then the same normal clients beside slow senders. A normal client
POSTs a WAV clip to /encode in a loop; a slow sender opens a connection, declares the same clip's
Content-Length and trickles its body at `--slow-rate` bytes/s, and opens a new connection as soon as the
server answers or closes one. For each phase it prints the normal clients' requests, success rate and p50/p99
latency, their other statuses, and what the slow senders got back.

    python bench/slow_senders.py                        # 4 clients, 8 slow senders at 1 byte/s, 30 s phases
    python bench/slow_senders.py --slow-senders 16 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_server import clip, start_server, stop_server  # noqa: E402


@dataclass
class Phase:
    """What one phase measured."""

    slow_senders: int
    requests: int = 0
    ok: int = 0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    slow_outcomes: dict[str, int] = field(default_factory=dict)

    def percentile(self, q: float) -> float | None:
        return round(float(np.percentile(np.array(self.latencies) * 1000, q)), 1) if self.latencies else None


def _count(table: dict[str, int], key: str) -> None:
    table[key] = table.get(key, 0) + 1


async def normal_client(url: str, wav: bytes, stop: float, phase: Phase) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                r = await client.post("/encode", content=wav, headers={"content-type": "audio/wav"})
                key = str(r.status_code)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            phase.requests += 1
            _count(phase.statuses, key)
            if key == "200":
                phase.ok += 1
                phase.latencies.append(time.perf_counter() - t0)
            else:
                await asyncio.sleep(0.05)  # a refused client backs off briefly


async def slow_sender(url: str, wav: bytes, rate: float, stop: float, phase: Phase) -> None:
    """Trickle `wav` to /encode at `rate` bytes/s, one connection after another, until `stop`."""
    parts = urlsplit(url)
    head = (
        f"POST /encode HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Type: audio/wav\r\n"
        f"Content-Length: {len(wav)}\r\n\r\n"
    ).encode()
    while time.perf_counter() < stop:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        answer = asyncio.ensure_future(reader.read(64))
        try:
            writer.write(head + wav[:10])
            sent = 10
            while sent < len(wav) and not answer.done() and time.perf_counter() < stop:
                await asyncio.wait([answer], timeout=1 / rate)
                if not answer.done():
                    writer.write(wav[sent : sent + 1])
                    sent += 1
            if answer.done():
                first = answer.result().split(b"\r\n", 1)[0].decode(errors="replace")
                _count(phase.slow_outcomes, first.split(" ", 2)[1] if first.startswith("HTTP/") else "closed")
            else:
                _count(phase.slow_outcomes, "still sending at the end")
        except OSError:
            _count(phase.slow_outcomes, "closed")
        finally:
            answer.cancel()
            writer.close()


async def run_phase(url: str, wav: bytes, clients: int, slow: int, rate: float, seconds: float) -> Phase:
    phase = Phase(slow)
    stop = time.perf_counter() + seconds
    await asyncio.gather(
        *(slow_sender(url, wav, rate, stop, phase) for _ in range(slow)),
        *(normal_client(url, wav, stop, phase) for _ in range(clients)),
    )
    return phase


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="target a running server instead of starting one")
    p.add_argument("--clients", type=int, default=4, help="normal clients (default: the slot count)")
    p.add_argument("--slow-senders", type=int, default=8, help="slow senders in the second phase")
    p.add_argument("--slow-rate", type=float, default=1.0, help="bytes per second a slow sender sends")
    p.add_argument("--seconds", type=float, default=30.0, help="duration of each phase")
    p.add_argument("--clip-seconds", type=float, default=2.0)
    p.add_argument("--max-concurrency", type=int, default=4, help="SIMVQ_MAX_CONCURRENCY of the started server")
    p.add_argument("--pool-size", type=int, help="SIMVQ_POOL_SIZE (default: CPU count)")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--model", help="SIMVQ_MODELS (default: the default model)")
    args = p.parse_args(argv)

    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        proc, url = start_server(args)
    try:
        wav = clip(args.clip_seconds)
        print(
            f"server {url}  slots {args.max_concurrency}  clip {args.clip_seconds:g} s ({len(wav)} B)  "
            f"{args.clients} normal clients  slow senders at {args.slow_rate:g} B/s  {args.seconds:g} s per phase  "
            f"cpus {os.cpu_count()}  load avg {os.getloadavg()[0]:.2f}"
        )
        print(
            f"{'slow senders':>12} {'requests':>8} {'ok':>6} {'success':>8} {'p50 ms':>8} {'p99 ms':>8}  "
            "normal clients' other statuses; what the slow senders got"
        )
        failed = False
        for slow in (0, args.slow_senders):
            r = asyncio.run(run_phase(url, wav, args.clients, slow, args.slow_rate, args.seconds))
            others = {k: v for k, v in r.statuses.items() if k != "200"}
            success = r.ok / r.requests if r.requests else 0.0
            fmt = lambda v: "-" if v is None else f"{v}"  # noqa: E731
            print(
                f"{slow:>12} {r.requests:>8} {r.ok:>6} {success:>8.1%} {fmt(r.percentile(50)):>8} "
                f"{fmt(r.percentile(99)):>8}  {others or '-'}; {r.slow_outcomes or '-'}",
                flush=True,
            )
            failed |= success < 1.0
        print(f"load avg at end {os.getloadavg()[0]:.2f}")
        return 1 if failed else 0
    finally:
        stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())
