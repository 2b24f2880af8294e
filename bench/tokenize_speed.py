"""Tokenisation throughput in audio hours per wall-clock hour (a benchmark, not a test): `simvq-codec tokenize`
locally with 1 and 2 worker processes, and through Ray Data with 2 actors, on the same files.

The files are the first `--minutes` of audio of a manifest or folder (default: the corpus of docs/corpus.md
when it is built, else generated speech-like clips of 2-12 s). Each mode writes a fresh output folder; its wall
time includes starting the workers and loading the model in each, not starting Ray itself (a cluster is up
before a job is submitted to it).

    python bench/tokenize_speed.py                     # 20 minutes of audio, bundled model
    python bench/tokenize_speed.py --input LibriTTS/dev-clean --minutes 60 --modes local1,ray
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_CORPUS = REPO / "data" / "corpus" / "train.csv"  # where `make corpus` builds it


def subset(source: Path | None, minutes: float, folder: Path) -> Path:
    """A manifest of the first `minutes` of audio of `source` (absolute paths), or of generated clips."""
    import soundfile as sf

    from training.tokenize import load_inputs

    rows, total = [], 0.0
    if source is not None:
        for item in load_inputs(source):
            try:
                seconds = sf.info(item.path).duration
            except Exception:  # noqa: BLE001 - an unreadable file is the tokenizer's to report
                continue
            rows.append((item.path, item.speaker))
            total += seconds
            if total >= minutes * 60:
                break
    else:
        from bench.support import speech_like

        i = 0
        while total < minutes * 60:
            seconds = 2.0 + (i * 3.7) % 10.0
            path = folder / "audio" / f"spk{i % 7}" / f"spk{i % 7}_{i:05d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, speech_like(seconds, seed=i), 16000, subtype="PCM_16")
            rows.append((str(path), f"spk{i % 7}"))
            total += seconds
            i += 1
    manifest = folder / "subset.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "speaker"])
        writer.writerows(rows)
    print(f"# {len(rows)} files, {total / 60:.1f} min of audio", file=sys.stderr)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, help="manifest or folder (default: the built corpus, else generated)")
    p.add_argument("--minutes", type=float, default=20.0, help="audio to tokenise per mode")
    p.add_argument("--model", default=None, help="model id or directory (default: the bundled model)")
    p.add_argument("--modes", default="local1,local2,ray", help="any of local1, local2, ray")
    p.add_argument("--shard-size", type=int, default=200)
    args = p.parse_args(argv)

    from training.tokenize import tokenize

    source = args.input or (DEFAULT_CORPUS if DEFAULT_CORPUS.is_file() else None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tokenize-bench-") as tmp:
        manifest = subset(source, args.minutes, Path(tmp))
        for mode in args.modes.split(","):
            workers = 1 if mode == "local1" else 2
            use_ray = mode == "ray"
            if use_ray:
                import ray

                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            try:
                t0 = time.perf_counter()
                result = tokenize(
                    manifest,
                    Path(tmp) / mode,
                    model=args.model,
                    workers=workers,
                    use_ray=use_ray,
                    shard_size=args.shard_size,
                    device="cpu",
                    threads=1,
                )
                wall = time.perf_counter() - t0
            finally:
                if use_ray:
                    ray.shutdown()
            rows.append((mode, workers, result, wall))
            print(f"# {mode}: {result.audio_seconds / 3600 / (wall / 3600):.0f} audio h/h", file=sys.stderr)

    print(
        f"\ninput: {source or 'generated speech-like clips'}; model: {args.model or 'bundled simvq-16k'}; "
        "1 torch thread per worker\n"
    )
    print("| mode | workers | files | failed | audio min | wall s | audio hours per hour |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, workers, r, wall in rows:
        label = {"local1": "local, in process", "local2": "local process pool", "ray": "Ray Data actors"}[mode]
        print(
            f"| {label} | {workers} | {r.encoded + r.failed} | {r.failed} | {r.audio_seconds / 60:.1f} | "
            f"{wall:.1f} | {r.audio_seconds / wall:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
