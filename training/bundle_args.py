"""The options of `python -m training.bundle_run` and `simvq-codec train-bundle` (light: the CLI registers them)."""

from __future__ import annotations

import argparse


def add_bundle_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `python -m training.bundle_run` and `simvq-codec train-bundle`."""
    p.add_argument("bundle", help="a folder written by `simvq-codec bundle`")
    p.add_argument(
        "--minutes",
        type=float,
        required=True,
        help="wall-clock minutes for this run, start-up and the last export included",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="the exported model and the portable checkpoint (a rerun with the same DIR resumes)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="crops per step (default: 64 on CUDA, the config's data.batch_size on the CPU)",
    )
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="default: the config's (auto)")
    p.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=3.0,
        help="minutes between checkpoints written into --out (default 3)",
    )
    p.add_argument(
        "--work",
        metavar="DIR",
        help="full checkpoints and logs (default: a folder named after --out in the temporary directory)",
    )
    p.add_argument("--workers", type=int, help="threads that decode the corpus (default: one per core)")
    p.add_argument("--model-id", default="simvq-16k", help="model id written into token files (default: simvq-16k)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (steps=..., optim.lr=...)")
