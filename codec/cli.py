"""The `simvq-codec` command line: a thin layer over `codec.api`.

Core commands live here; `train`, `export`, `eval`, `serve` and others are discovered from the entry-point
group `simvq_codec.commands` (each names a `register(subparsers)`), so `codec` imports nothing from the
packages that build on it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import signal
import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Iterator

EXIT_USAGE = 2

EPILOG = """examples:
  simvq-codec compress speech.wav speech.tok           # all stages (6 kbit/s)
  simvq-codec compress speech.flac speech.tok --bitrate 1.5
  simvq-codec decompress speech.tok restored.wav
  simvq-codec info speech.tok
  cat in.wav | simvq-codec compress - - | simvq-codec decompress - - > out.wav
"""


OUTPUT_NOTE = """\
output: a file is written under a temporary name and renamed into place on success, so a failure (SIGTERM
included) leaves nothing. Output to - streams as it is made; a file that standard output is redirected to
is cut back to its length before the command if it fails. On a pipe nothing is written before the first
10 s of input have been read, so a shorter input that fails leaves no output at all, but a longer one can
leave partial output. The exit status (0 only when the output is complete) is what to check; {partial}
"""
COMPRESS_PARTIAL = "a partial .tok has no CRC trailer, so every reader refuses it."
DECOMPRESS_PARTIAL = (
    "a partial WAV's header declares the full length when the .tok knows it (so compress "
    "refuses it as truncated), and FLAC on a pipe is written only on success."
)


def count(text: str) -> int:
    """argparse type: a whole number of at least 1 (threads, jobs)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def amount(text: str) -> float:
    """argparse type: a finite number above 0 (sizes, rates); NaN and infinity are refused."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return value


def _fail(message: str) -> int:
    print(f"simvq-codec: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _check_paths(src: str, dst: str, force: bool) -> str | None:
    from codec.output import check_destination

    if dst == "-":
        return None
    if src != "-" and os.path.abspath(src) == os.path.abspath(dst):
        return "input and output are the same file"
    check_destination(dst)
    if Path(dst).exists() and not force:
        return f"{dst} exists: pass --force to overwrite it"
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C raises KeyboardInterrupt, so that a command removes its temporary output."""


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Ctrl-C and SIGTERM raise (KeyboardInterrupt, Terminated) in the main thread, once, wherever it waits.

    A process's signal can land on any of its threads (torch's, tqdm's), where Python only notes it, and a
    main thread blocked reading a pipe would not look until input came. So a relay thread reads the note
    (the wakeup fd) and signals the main thread, again every 50 ms until the handler has run (a delivery
    just as the main thread enters read() can go unseen); the deliveries after the first are ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def handler(signum: int, frame) -> None:
        if not caught:
            caught.append(signum)
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    main, done = threading.get_ident(), threading.Event()

    def relay() -> None:
        with open(read_fd, "rb", buffering=0) as notes:
            note = notes.read(1)
            while note and not caught and not done.is_set():
                signal.pthread_kill(main, note[0])
                done.wait(0.05)
            while notes.read(1024):  # open until the end, for the notes of later signals
                pass

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    relaying = threading.Thread(target=relay, name="signal-relay", daemon=True)
    relaying.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(previous_fd)
        os.close(write_fd)  # the relay reads the end of its pipe and returns
        relaying.join()
        for sig, old in previous.items():
            signal.signal(sig, old)


def _cleans_up_when_stopped(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command that writes files, run so that Ctrl-C and SIGTERM alike remove its temporary output."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        with _signals_raise():
            return command(args)

    return run


def _progress_wanted(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


@_cleans_up_when_stopped
def cmd_compress(args) -> int:
    from codec import api

    if problem := _check_paths(args.input, args.output, args.force):
        return _fail(problem)
    header, info = api.compress(
        args.input,
        args.output,
        model=args.model,
        n_stages=args.stages,
        bitrate=args.bitrate,
        progress=_progress_wanted(args),
    )
    if info.needs_conversion(header.sample_rate) and not args.quiet:
        print(f"note: input is {info.describe()}; converted to mono {header.sample_rate} Hz", file=sys.stderr)
    if not args.quiet and args.output != "-":
        seconds = header.num_samples / header.sample_rate
        size = Path(args.output).stat().st_size
        print(
            f"{args.output}: {seconds:.2f} s, {header.n_stages} stages, {file_bitrate(size, seconds)}", file=sys.stderr
        )
    return 0


def file_bitrate(size: int, seconds: float) -> str:
    """A .tok file's kbit/s with its size; under 1 s of audio only the size, since the fixed header (tens of
    bytes) is then most of the file and a rate would say nothing of the codec (9,088,000 kbit/s for 1 sample)."""
    if seconds < 1.0:
        return f"{size} bytes (no rate for under 1 s of audio: the header is most of the file)"
    return f"{size * 8 / seconds / 1000:.3f} kbit/s ({size} bytes)"


@_cleans_up_when_stopped
def cmd_decompress(args) -> int:
    from codec import api

    if problem := _check_paths(args.input, args.output, args.force):
        return _fail(problem)
    header, clipped = api.decompress(
        args.input, args.output, model=args.model, format=args.format, progress=_progress_wanted(args)
    )
    if clipped:
        print(f"warning: {clipped} samples were clipped to [-1, 1]", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from codec import presets
    from codec.api import open_input
    from codec.errors import CodecError
    from codec.tokfile import TokReader, bits_text

    with open_input(args.file) as f:
        reader = TokReader(f)
        for _ in reader:  # reads and verifies the whole file (CRC, counts)
            pass
        h, size = reader.header, reader.bytes_read
    try:  # the installed model that made the codes completes the header (a version-2 file has no rate)
        installed = presets.model_for_tokens(h)
        h = presets.load_model(installed, warn=False).check(h)
    except CodecError:
        installed = "no"
    named = "" if h.model_id is None else f"{h.model_id}, "
    rows = [
        ("model", f"{named}weights {h.weights_hash.hex()} (installed here: {installed})"),
        ("format", f"version {h.version}"),
        ("stages", bits_text(h.stage_bits)),
        ("samples", f"{h.num_samples}"),
        ("frames", f"{h.num_frames} (hop {h.hop_length} samples)"),
    ]
    if h.sample_rate is None:
        rows.append(("file size", f"{size} bytes (rate and duration unknown: the model is not installed)"))
    else:
        seconds = h.num_samples / h.sample_rate
        rows[2:2] = [("sample rate", f"{h.sample_rate} Hz"), ("frame rate", f"{h.frame_rate:g} Hz")]
        rows += [
            ("duration", f"{seconds:.3f} s"),
            ("nominal bitrate", f"{h.nominal_bitrate / 1000:.3f} kbit/s"),
            ("file bitrate", file_bitrate(size, seconds)),
        ]
    for key, value in rows:
        print(f"{key:16} {value}")
    return 0


def cmd_models(args) -> int:
    from codec import presets

    for model_id in presets.list_models():
        config = presets.describe(model_id)
        state = "trained" if config.get("trained") else "UNTRAINED stand-in"
        rates = ", ".join(f"{r:g}" for r in config["bitrates_kbps"])
        default = " (default)" if model_id == presets.DEFAULT_MODEL_ID else ""
        print(f"{model_id}{default}: {presets.MODELS[model_id][1]}")
        print(f"  {state}; {config['parameters'] / 1e6:.2f} M parameters; kbit/s by stage count: {rates}")
    return 0


@_cleans_up_when_stopped
def cmd_export_onnx(args) -> int:
    from codec import onnx_export, presets

    out = Path(args.out_dir)
    files = [out / name for name in (onnx_export.ENCODER_FILE, onnx_export.DECODER_FILE, onnx_export.CONTRACT_FILE)]
    if not args.force and (existing := [str(f) for f in files if f.exists()]):
        return _fail(f"{', '.join(existing)} exist: pass --force to overwrite them")
    info = onnx_export.export_onnx(presets.load_model(args.model), out)
    if not args.quiet:
        sizes = ", ".join(f"{f.name} {f.stat().st_size / 1e6:.1f} MB" for f in files[:2])
        print(
            f"{out}: {sizes}, {files[2].name} ({info['model_id']}, weights {info['sha256'][:16]}, "
            f"{len(info['encoder']['state'])} + {len(info['decoder']['state'])} state tensors)",
            file=sys.stderr,
        )
    return 0


EXPORT_ONNX_NOTE = """\
Each graph is one streaming step over T whole frames (T = 1: frame by frame, 20 ms; the whole utterance
with the initial state: offline):
  encoder.onnx  audio [B, T*hop] float32 + state  ->  codes [B, n_stages, T] int64 + next state
  decoder.onnx  codes [B, S, T] int64 (S = 1 .. n_stages) + state  ->  audio [B, T*hop] float32 + next state
State input NAME comes back as output next.NAME; feed it to the next step. codec.json lists every state
tensor (name, shape, dtype, initial value) with the model's id, hash, sample rate, hop, stage count and
decoder_delay: the first decoder_delay samples of a decoded stream lie before its start (drop them), and
at its end the decoder state synthesis.tail holds the last decoder_delay samples.
A runner that needs only numpy, soundfile and onnxruntime: examples/onnx_runner.py (docs/deploy.md).
Needs the onnx package: pip install 'simvq-codec[onnx]'.
"""


CORE_COMMANDS = ("compress", "decompress", "info", "models", "export-onnx")


def build_parser(plugins: bool = True) -> argparse.ArgumentParser:
    """The full parser; `plugins=False` skips the entry-point commands (faster start for core commands)."""
    parser = argparse.ArgumentParser(
        prog="simvq-codec",
        description="SimVQ neural speech codec: compress speech into discrete tokens (.tok files) and back.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--threads", type=count, help="CPU threads for the model (default: all cores)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "compress",
        help="audio (WAV, FLAC, OGG; any rate and channels) -> .tok",
        description="Compress audio into a .tok token file. Input is mixed down to mono and "
        "resampled to the model's rate.",
        epilog=OUTPUT_NOTE.format(partial=COMPRESS_PARTIAL),
    )
    p.add_argument("input", help="audio file, or - for stdin")
    p.add_argument("output", help=".tok file, or - for stdout")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument(
        "--bitrate",
        type=float,
        metavar="KBPS",
        help="target kbit/s: the largest number of stages that fits; any rate at or above the "
        "top one (inf included) means all stages (default: all stages)",
    )
    rate.add_argument(
        "--stages",
        type=int,
        metavar="N",
        help="number of residual stages to keep (1 to the model's stage count; default: all)",
    )
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser(
        "decompress",
        help=".tok -> audio (WAV, or FLAC by extension)",
        description="Decode a .tok file back to audio with exactly the original length.",
        epilog=OUTPUT_NOTE.format(partial=DECOMPRESS_PARTIAL),
    )
    p.add_argument("input", help=".tok file, or - for stdin")
    p.add_argument("output", help="output .wav or .flac, or - for WAV on stdout")
    p.add_argument("--format", choices=["wav", "flac"], help="output format (default: by extension, else wav)")
    p.set_defaults(func=cmd_decompress)

    for p in (sub.choices["compress"], sub.choices["decompress"]):
        p.add_argument(
            "--model",
            metavar="ID|DIR",
            help="model id or directory (default: simvq-16k; decompress: "
            "the installed model whose weights made the file)",
        )
        p.add_argument("-f", "--force", action="store_true", help="overwrite the output if it exists")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or notes")

    p = sub.add_parser("info", help="show a .tok file's header, duration and bitrate")
    p.add_argument("file", help=".tok file, or - for stdin")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("models", help="list the models this installation has")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "export-onnx",
        help="write the streaming encoder and decoder as ONNX graphs",
        description="Export a model as two ONNX graphs with explicit streaming state "
        "(encoder.onnx, decoder.onnx) and their state contract (codec.json).",
        epilog=EXPORT_ONNX_NOTE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write into (created if missing)")
    p.add_argument("--model", metavar="ID|DIR", help="model id or directory (default: simvq-16k)")
    p.add_argument("-f", "--force", action="store_true", help="overwrite the files if they exist")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    p.set_defaults(func=cmd_export_onnx)

    for entry in entry_points(group="simvq_codec.commands") if plugins else ():
        try:
            entry.load()(sub)
        except ImportError as exc:  # an optional part whose dependencies are not installed
            print(f"simvq-codec: note: command {entry.name!r} unavailable ({exc})", file=sys.stderr)
    return parser


def _is_core_command(argv: list[str]) -> bool:
    words = [a for a in argv if not a.startswith("-")]
    return bool(words) and words[0] in CORE_COMMANDS


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args`, except that KEY=VALUE words after an option still join the command's
    `overrides` list (argparse stops collecting it at the first option: `train a=1 --run-dir R b=2`)."""
    args, extra = parser.parse_known_args(argv)
    if (
        extra
        and isinstance(getattr(args, "overrides", None), list)
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def os_error_line(exc: OSError) -> str:
    """One line for an OSError that escaped a command: the path it concerns and the cause. One that names no
    path came from printing to standard output (`info > /dev/full`)."""
    from codec.output import STDOUT, output_error

    if exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    with contextlib.suppress(OSError, ValueError):  # what could not be printed must not be retried at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return str(output_error(STDOUT, exc))


def main(argv: list[str] | None = None) -> int:
    from codec.errors import CodecError

    argv = sys.argv[1:] if argv is None else argv
    args = parse_command_line(build_parser(plugins=not _is_core_command(argv)), argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a failure here is an output error like any other
        return code
    except CodecError as exc:
        return _fail(str(exc))
    except Terminated:
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 1
    except OSError as exc:
        return _fail(os_error_line(exc))


if __name__ == "__main__":
    sys.exit(main())
