"""`simvq-codec serve`: run the service on uvicorn (websockets implementation); settings from SIMVQ_*."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.settings import Settings

EPILOG = """examples:
  simvq-codec serve                               # 127.0.0.1:8000, one process
  simvq-codec serve --host 0.0.0.0 --port 9000 --workers 2
  SIMVQ_MAX_CONCURRENCY=8 SIMVQ_TORCH_THREADS=2 simvq-codec serve
  simvq-codec serve --ray --replicas 2            # through Ray Serve: replicas, batching, queue limit
every setting is an environment variable SIMVQ_<NAME> (docs/service.md); Ray Serve's are SIMVQ_RAY_<NAME>
(docs/deploy.md)"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve` subcommand (entry point of group `simvq_codec.commands`)."""
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP and WebSocket service",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", help="address to bind (default: SIMVQ_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (default: SIMVQ_PORT or 8000)")
    p.add_argument(
        "--workers", type=int, default=1, help="uvicorn worker processes, each loading the model (default: 1)"
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    ray = p.add_argument_group("Ray Serve (pip install 'simvq-codec[ray]')")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="serve through Ray Serve: local Ray, or the cluster of --ray-address / RAY_ADDRESS",
    )
    ray.add_argument("--ray-address", help="Ray cluster to join (e.g. auto or ray://head:10001)")
    ray.add_argument("--replicas", type=int, help="replicas; 0 autoscales (default: SIMVQ_RAY_REPLICAS or 1)")
    ray.add_argument("--no-batching", action="store_true", help="send each clip to the model alone")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from server.app import configure_logging, create_app
        from server.protocol import uvicorn_options
        from server.settings import Settings
    except ImportError as exc:
        print(
            f"simvq-codec: error: the service needs its extras ({exc.name} is missing): "
            "pip install 'simvq-codec[server]'",
            file=sys.stderr,
        )
        return 2

    flags = {"host": ("--host", args.host), "port": ("--port", args.port)}
    threads = getattr(args, "threads", None)  # the global --threads of simvq-codec
    if threads and "SIMVQ_TORCH_THREADS" not in os.environ:
        flags["torch_threads"] = ("--threads", threads)
    for key, (_, value) in flags.items():
        if value is not None:
            os.environ[f"SIMVQ_{key.upper()}"] = str(value)  # worker processes read the same settings
    from pydantic import ValidationError

    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        key = ".".join(str(x) for x in first["loc"])
        flag, value = flags.get(key, (None, None))
        name = flag if value is not None else f"SIMVQ_{key.upper()}"  # the option given, else the variable
        print(f"simvq-codec: error: {name}: {first['msg']}", file=sys.stderr)
        return 2
    if getattr(args, "ray", False):
        return _serve_ray(args, settings)
    if args.workers < 1:
        print("simvq-codec: error: --workers must be at least 1", file=sys.stderr)
        return 2
    common = dict(
        host=settings.host,
        port=settings.port,
        **uvicorn_options(settings),
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        log_level=args.log_level,
        proxy_headers=True,
    )
    if args.workers == 1:
        configure_logging()
        uvicorn.run(create_app(settings), **common)
    else:
        # each worker imports torch before answering the supervisor's health check: allow for a slow start
        uvicorn.run(
            "server.app:app_from_env", factory=True, workers=args.workers, timeout_worker_healthcheck=60, **common
        )
    return 0


def _serve_ray(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from server import ray_serve
    except ImportError as exc:
        print(
            f"simvq-codec: error: --ray needs Ray Serve ({exc.name} is missing): pip install 'simvq-codec[ray]'",
            file=sys.stderr,
        )
        return 2
    try:
        options = ray_serve.options_from_env(replicas=args.replicas, batching=False if args.no_batching else None)
    except ValueError as exc:
        print(f"simvq-codec: error: {exc}", file=sys.stderr)
        return 2
    return ray_serve.run(settings, options, address=args.ray_address)


def main(argv: list[str] | None = None) -> int:
    """`python -m server` without the codec CLI."""
    parser = argparse.ArgumentParser(prog="python -m server")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
