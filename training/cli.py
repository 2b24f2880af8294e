"""`simvq-codec train` and `simvq-codec export`: the training commands of the CLI (entry-point plugin)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codec.cli import parse_command_line
from codec.errors import CodecError

TRAIN_EPILOG = """examples:
  simvq-codec train --config training/configs/simvq-16k.yaml --run-dir runs/simvq-16k
  simvq-codec train --config training/configs/simvq-16k.yaml optim.lr=3e-4 model.n_stages=8 data.batch_size=32
  simvq-codec train --run-dir runs/simvq-16k                     # resume with the run's saved config
  torchrun --nproc-per-node 4 -m training train --config training/configs/simvq-16k.yaml --run-dir runs/x
"""


def register(subparsers) -> None:
    """Add `train` and `export` to the `simvq-codec` subcommands."""
    p = subparsers.add_parser(
        "train",
        help="train a codec (resumes when the run directory has a checkpoint)",
        description="Train the codec on a manifest or folder of speech. Every key of the config can be "
        "overridden as key=value (dotted: optim.lr=3e-4). A run directory with a checkpoint is resumed.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="YAML config (default: RUN_DIR/config.yaml if it exists, "
                   "else the built-in defaults)")
    p.add_argument("--run-dir", metavar="DIR", help="checkpoints and logs (default: runs/<config name>)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "export",
        help="write a training checkpoint's EMA weights as a model directory",
        description="Export the EMA generator of a checkpoint (a .pt file or a run directory: its latest "
        "checkpoint) as model.safetensors + config.json, loadable with `compress --model OUT_DIR`.",
    )
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument("out_dir", help="output model directory")
    p.add_argument("--model-id", default="simvq-16k", help="model id written into token files (default: simvq-16k)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="storage precision of the weights; float16 halves the size (default: float32)")
    p.add_argument("--weights", choices=["ema", "live"], default="ema",
                   help="the EMA of the weights (default), or the optimiser's current weights: better for a "
                   "checkpoint taken soon after a run changed course, when the EMA still mixes before and after")
    p.add_argument("-f", "--force", action="store_true", help="replace an existing model directory")
    p.set_defaults(func=cmd_export)


def cmd_train(args) -> int:
    from training.config import load_config
    from training.train import train

    name = Path(args.config).stem if args.config else "default"
    run_dir = Path(args.run_dir or Path("runs") / name)
    config = args.config
    if config is None and (run_dir / "config.yaml").is_file():
        config = run_dir / "config.yaml"
    cfg = load_config(config, args.overrides)
    last = train(cfg, run_dir)
    if last is not None:
        print(f"last checkpoint: {last}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    import torch

    from training.export import export

    out = Path(args.out_dir)
    if (out / "config.json").exists() and not args.force:
        raise CodecError(f"{out} already holds a model: pass --force to replace it")
    path = export(args.checkpoint, out, args.model_id, dtype=getattr(torch, args.dtype), weights=args.weights)
    print(f"exported {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m training train|export ...` (the same commands without the rest of the CLI)."""
    parser = argparse.ArgumentParser(prog="python -m training", description="SimVQ codec training commands.")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parse_command_line(parser, sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except CodecError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
