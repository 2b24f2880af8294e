"""`simvq-codec train`, `export`, `bundle` and `train-bundle`: the training commands of the CLI (entry-point plugin)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codec.cli import amount, count, parse_command_line
from codec.errors import CodecError
from training.bundle_args import add_bundle_run_arguments

TRAIN_EPILOG = """examples:
  simvq-codec train --config training/configs/simvq-16k.yaml --run-dir runs/simvq-16k
  simvq-codec train --config training/configs/simvq-16k.yaml phases.polish.steps=2000 data.batch_size=32
  simvq-codec train --config training/configs/simvq-16k.yaml init_from=   # from scratch
  simvq-codec train --run-dir runs/simvq-16k                     # resume with the run's saved config
  torchrun --nproc-per-node 4 -m training train --config training/configs/simvq-16k.yaml --run-dir runs/x
"""

BUNDLE_EPILOG = """examples:
  simvq-codec bundle data/corpus bundle/ --wheels        # 40 MiB: corpus as Opus, config, wheels
  simvq-codec bundle data/corpus bundle/ --init runs/simvq-16k --max-mb 100 phases.polish.steps=60000
  python -m training.bundle_run bundle/ --minutes 9 --out out/   # on the GPU machine (docs/training.md)
"""


def register(subparsers) -> None:
    """Add `train`, `export`, `bundle` and `train-bundle` to the `simvq-codec` subcommands."""
    p = subparsers.add_parser(
        "train",
        help="train a codec (resumes when the run directory has a checkpoint)",
        description="Train the codec on a manifest or folder of speech. Every key of the config can be "
        "overridden as key=value (dotted: optim.lr=3e-4). A run directory with a checkpoint is resumed.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config (default: RUN_DIR/config.yaml if it exists, else the built-in defaults)",
    )
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
    p.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="storage precision of the weights; float16 halves the size (default: float32)",
    )
    p.add_argument(
        "--weights",
        choices=["ema", "live"],
        default="ema",
        help="the EMA of the weights (default), or the optimiser's current weights: better for a "
        "checkpoint taken soon after a run changed course, when the EMA still mixes before and after",
    )
    p.add_argument("-f", "--force", action="store_true", help="replace an existing model directory")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "bundle",
        help="pack a corpus (as Opus), a config and wheels into one folder for a GPU machine without network",
        description="Pack the training files of CORPUS (as Ogg Opus), the dev clips, the training config and "
        "optionally a starting point and the wheels the run needs into OUT_DIR, at most --max-mb in all; "
        "`python -m training.bundle_run OUT_DIR` trains from it. When not all files fit, whole files are taken "
        "round-robin over the speakers.",
        epilog=BUNDLE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("corpus", help="corpus folder (train.csv, dev.csv), manifest, or folder of audio")
    p.add_argument("out_dir", help="the bundle folder to write")
    p.add_argument(
        "--config",
        metavar="FILE",
        default=str(Path(__file__).parent / "configs" / "simvq-16k.yaml"),
        help="training config (default: training/configs/simvq-16k.yaml)",
    )
    p.add_argument("--max-mb", type=amount, default=40.0, help="cap on the whole bundle in MiB (default 40)")
    p.add_argument("--kbps", type=amount, default=24.0, help="Opus bitrate of the audio (default 24)")
    p.add_argument(
        "--init",
        metavar="REF",
        help="start from: an installed model id or model directory "
        "(weights), or a run directory, checkpoint or bundle_run output (all training state); "
        "default: the config's init_from",
    )
    p.add_argument(
        "--wheels",
        action="store_true",
        help="add the wheels of every package beyond torch, numpy "
        "and scipy that the run needs, for CPython 3.12 on manylinux x86_64 (pip download)",
    )
    p.add_argument("--min-hours", type=float, default=0.25, help="refuse when less speech fits (default 0.25)")
    p.add_argument("--jobs", type=count, help="encoding threads (default: all cores)")
    p.add_argument("-f", "--force", action="store_true", help="replace an existing bundle")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=cmd_bundle)

    p = subparsers.add_parser(
        "train-bundle",
        help="train from a bundle for a fixed number of minutes (python -m training.bundle_run)",
        description="Decode the bundle's corpus onto the device once and train until shortly before --minutes "
        "are up, writing the exported model and a portable checkpoint into --out every few minutes.",
    )
    add_bundle_run_arguments(p)
    p.set_defaults(func=cmd_train_bundle)


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


def cmd_bundle(args) -> int:
    from training.bundle import pack
    from training.config import load_config

    cfg = load_config(args.config, args.overrides)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    s = pack(
        Path(args.corpus),
        Path(args.out_dir),
        cfg,
        args.kbps,
        int(args.max_mb * 2**20),
        args.init,
        args.wheels,
        args.min_hours,
        args.jobs,
        args.force,
        log,
    )
    share = (
        f"all {s.corpus_files} files"
        if s.train_files == s.corpus_files
        else (f"{s.train_files} of {s.corpus_files} files, {s.corpus_hours:.2f} h in the corpus")
    )
    ood = f" and {s.dev_ood_clips} out-of-domain" if s.dev_ood_clips else ""
    log(
        f"{s.path}: {s.bytes / 2**20:.1f} MiB; {s.train_hours:.2f} h of training speech fit ({share}, "
        f"{s.train_speakers} speakers), {s.dev_clips} dev clips{ood}, Opus {s.kbps:.1f} kbit/s as packed"
    )
    return 0


def cmd_train_bundle(args) -> int:
    from training.bundle_run import run

    return run(args)


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
