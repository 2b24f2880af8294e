"""`simvq-codec eval` and `python -m eval`: score the model, Opus and Codec 2 on a folder or manifest of speech."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from codec.errors import CodecError

EXIT_USAGE = 2

DESCRIPTION = """Score a model of this project against Opus and Codec 2 on speech: wideband PESQ, STOI, ESTOI,
SI-SDR and multi-scale mel distance after delay alignment, bitrate from the actual file bytes, speed,
and per-stage codebook use. Writes results.json, results.csv, report.md and PNG plots to --out."""

EPILOG = """examples:
  simvq-codec eval data/corpus/manifest.csv --split test --out runs/eval
  simvq-codec eval clips/ --out runs/eval --stages 1,4,12 --limit 20
  simvq-codec eval dev.csv --out runs/eval-dev --per-speaker 25      # every voice, 25 files each
  simvq-codec eval clips/ --out runs/eval --no-model --jobs 1        # peers only
  python -m eval clips/ --out runs/eval --bitrates 1.5,3,6 --peers opus
"""


def comma_list(kind):
    """An argparse type: a comma-separated list of `kind` values (not empty)."""

    def parse(text: str) -> list:
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}, got {text!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError("the list is empty")
        return values

    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="folder (scanned for wav/flac/ogg), manifest CSV (a path column, optionally speaker, duration, "
        "split, kind; other columns ignored; paths relative to the CSV) or audio file",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--split", help="keep only manifest rows of this split (e.g. test)")
    p.add_argument(
        "--per-speaker",
        type=_positive,
        metavar="N",
        help="at most N files per speaker (manifest column, or a folder's subfolder), evenly spread",
    )
    p.add_argument("--limit", type=_positive, metavar="N", help="only the first N files")
    model = p.add_argument_group("model")
    model.add_argument("--model", metavar="ID|DIR", help="preset id or model directory (default: simvq-16k)")
    model.add_argument("--no-model", action="store_true", help="score the peer codecs only")
    rate = model.add_mutually_exclusive_group()
    rate.add_argument(
        "--stages",
        type=comma_list(int),
        metavar="LIST",
        help="stage counts to score (default: 1,2,3,4,6,8,12 up to the model's stage count, plus all stages)",
    )
    rate.add_argument(
        "--bitrates",
        type=comma_list(float),
        metavar="LIST",
        help="kbit/s targets, e.g. 1.5,3,6 (each -> the most stages that fit)",
    )
    model.add_argument(
        "--unquantized",
        action="store_true",
        help="also score the model's latent decoded without its quantizer (no tokens, no bitrate): "
        "the ceiling that shows what the quantizer costs a model in training",
    )
    peers = p.add_argument_group("peer codecs")
    peers.add_argument(
        "--peers",
        type=comma_list(str),
        default=["opus", "codec2"],
        metavar="LIST",
        help="peer codecs to run: opus,codec2 (default both)",
    )
    peers.add_argument("--no-peers", action="store_true", help="score the model only")
    peers.add_argument(
        "--opus-kbps",
        type=comma_list(float),
        default=[6.0, 8.0, 12.0],
        metavar="LIST",
        help="Opus target bitrates (default 6,8,12)",
    )
    peers.add_argument(
        "--codec2-modes",
        type=comma_list(str),
        default=["3200", "1600", "700C"],
        metavar="LIST",
        help="Codec 2 modes (default 3200,1600,700C)",
    )
    p.add_argument("--pesq-nb", action="store_true", help="also score narrowband PESQ (8 kHz)")
    p.add_argument(
        "--max-delay-ms", type=float, default=100.0, metavar="MS", help="delay alignment search bound (default 100)"
    )
    p.add_argument(
        "--jobs",
        type=_positive,
        default=os.cpu_count() or 1,
        help="worker processes over files (default: CPU count; use 1 for speed figures)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("-f", "--force", action="store_true", help="overwrite results already in --out")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary on stdout")


def run(args: argparse.Namespace) -> int:
    """Run an evaluation from parsed arguments; returns the exit code (2 on a user error)."""
    try:
        return _run(args)
    except CodecError as exc:
        print(f"simvq-codec eval: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    from eval.dataset import list_inputs
    from eval.peers import peer_codecs
    from eval.report import write_report
    from eval.run import evaluate

    if (args.out / "results.json").exists() and not args.force:
        raise CodecError(f"{args.out} already holds results: pass --force to overwrite them")
    if args.no_model and args.no_peers:
        raise CodecError("--no-model and --no-peers leave nothing to evaluate")
    items = list_inputs(args.inputs, split=args.split, limit=args.limit, per_speaker=args.per_speaker)
    codecs: list = []
    if not args.no_model:
        from eval.model import model_settings

        codecs += model_settings(args.model, stages=args.stages, bitrates=args.bitrates)
        if args.unquantized:
            from eval.model import UnquantizedSetting

            codecs.append(UnquantizedSetting(args.model, codecs[0].codec))
    if not args.no_peers:
        try:
            codecs += peer_codecs(tuple(args.peers), tuple(args.opus_kbps), tuple(args.codec2_modes))
        except ValueError as exc:
            raise CodecError(str(exc)) from None
    result = evaluate(
        items, codecs, jobs=args.jobs, max_delay_ms=args.max_delay_ms, pesq_nb=args.pesq_nb, progress=not args.quiet
    )
    result.config["sources"] = [str(s) for s in args.inputs] + ([f"split={args.split}"] if args.split else [])
    paths = write_report(result, args.out, plots=not args.no_plots)
    for codec, why in result.skipped.items():
        print(f"simvq-codec eval: skipped {codec}: {why}", file=sys.stderr)
    if not args.quiet:
        print((args.out / "report.md").read_text(), end="")
        print(f"\nwrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    """Add the `eval` subcommand to the `simvq-codec` parser (entry point `simvq_codec.commands`)."""
    p = subparsers.add_parser(
        "eval",
        help="score the model against Opus and Codec 2 (PESQ, STOI, SI-SDR, ...)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
