"""`simvq-codec bundle`: one folder of bounded size that `training.bundle_run` trains from with no network.

    BUNDLE/bundle.json      what is inside: format, sizes, hours, speakers, the Opus bitrate, wheels
    BUNDLE/config.yaml      the training config; data paths and `init_from` relative to the bundle
    BUNDLE/train.csv        path,speaker,duration of the training files (a subset when not all fit)
    BUNDLE/dev.csv          the dev clips the trainer scores (`data.dev_clips`, at most `data.dev_clip_samples`)
    BUNDLE/dev-ood.csv      with `data.dev_ood`: as many clips of that out-of-domain dev set, chosen the same way
    BUNDLE/train/*.opus     Ogg Opus, mono, at the model rate; also BUNDLE/dev/*.opus and BUNDLE/dev-ood/*.opus
    BUNDLE/init/            optional: a model or portable checkpoint to start from (`--init`)
    BUNDLE/wheels/*.whl     optional: every package beyond torch, numpy and scipy, for CPython 3.12 (`--wheels`)

Audio is Opus at `--kbps` (24 kbit/s by default: docs/training.md has the coding loss). When the training
files do not all fit under `--max-mb`, whole files are taken round-robin over the speakers, each speaker's
in sha1 order, until the next does not fit: every speaker keeps a share and the choice is the same on every
machine.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from codec.errors import CodecError
from training.config import TrainConfig, dump_config
from training.data import AudioItem, decode, dev_clip_audio, load_dev_ood, load_items, split_items

BUNDLE_FORMAT = "simvq-codec-bundle/1"
DEFAULT_KBPS = 24.0
# What `training.bundle_run` imports beyond torch, numpy and scipy (tests/test_bundle.py checks the list).
WHEELS = ("soundfile", "cffi", "pycparser", "soxr", "pyyaml", "safetensors", "tqdm")
WHEEL_PYTHON = "3.12"
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
ROW_BYTES = 80  # a manifest row, counted against the budget with each file


class BundleError(CodecError):
    """A bundle that cannot be made (nothing sensible fits, a bad corpus) or read."""


@dataclass(frozen=True)
class BundleSummary:
    """What `pack` put into a bundle.

    Args:
        path: the bundle folder.
        bytes: its size.
        train_files, train_hours, train_speakers: the training audio packed.
        corpus_files, corpus_hours: the training audio the corpus had.
        dev_clips: dev clips packed.
        dev_ood_clips: clips of the out-of-domain dev set (`data.dev_ood`) packed; 0 without one.
        kbps: the bitrate of the packed audio (bytes over duration, container included).
        wheel_bytes, init_bytes: the size of the wheels and of the starting point.
    """

    path: Path
    bytes: int
    train_files: int
    train_hours: float
    train_speakers: int
    corpus_files: int
    corpus_hours: float
    dev_clips: int
    dev_ood_clips: int
    kbps: float
    wheel_bytes: int
    init_bytes: int


def opus_level(kbps: float) -> float:
    """libsndfile's compression level for an Opus bitrate: it sets (1 - level) * 250 + 6 kbit/s per channel."""
    if not 6.0 <= kbps <= 256.0:
        raise BundleError(f"--kbps {kbps:g}: Opus through libsndfile takes 6 to 256 kbit/s")
    return 1.0 - (kbps - 6.0) / 250.0


def write_opus(path: Path, audio: np.ndarray, sample_rate: int, kbps: float) -> None:
    """Write int16 [T] audio as mono Ogg Opus (VBR) at about `kbps`; libsndfile reads back exactly T samples."""
    sf.write(
        path,
        audio.astype(np.float32) / 32768.0,
        sample_rate,
        format="OGG",
        subtype="OPUS",
        compression_level=opus_level(kbps),
    )


def read_bundle(folder: Path) -> dict:
    """The parsed `bundle.json` of a bundle folder."""
    try:
        info = json.loads((Path(folder) / "bundle.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{folder} is not a training bundle (bundle.json: {e})") from None
    if not isinstance(info, dict) or info.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{folder}/bundle.json is not a {BUNDLE_FORMAT} bundle")
    return info


def corpus_items(corpus: Path, dev_fraction: float) -> tuple[list[AudioItem], list[AudioItem]]:
    """Train and dev files of a corpus folder with `train.csv` (and `dev.csv`), or of anything `load_items` takes."""
    corpus = Path(corpus)
    if (corpus / "train.csv").is_file():
        dev = corpus / "dev.csv"
        return split_items(load_items(corpus / "train.csv"), load_items(dev) if dev.is_file() else None, dev_fraction)
    return split_items(load_items(corpus), None, dev_fraction)


def speaker_order(items: list[AudioItem]) -> list[AudioItem]:
    """Round-robin over speakers (sorted), each speaker's files in sha1 order of their paths."""
    by_speaker: dict[str, list[AudioItem]] = {}
    for item in sorted(items, key=lambda it: hashlib.sha1(str(it.path).encode()).hexdigest()):
        by_speaker.setdefault(item.speaker, []).append(item)
    queues = [deque(by_speaker[s]) for s in sorted(by_speaker)]
    order = []
    while any(queues):
        order.extend(q.popleft() for q in queues if q)
    return order


def download_wheels(folder: Path) -> None:
    """`pip download` the wheels of `WHEELS`, at the versions installed here, for CPython 3.12 on manylinux."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        wanted = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    except importlib.metadata.PackageNotFoundError as e:
        raise BundleError(f"--wheels: {e.name} is not installed here") from None
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        WHEEL_PYTHON,
        "--implementation",
        "cp",
        *platforms,
        "-d",
        str(folder),
        *wanted,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        lines = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or proc.stderr.splitlines()
        raise BundleError(f"--wheels: pip download failed: {lines[-1] if lines else proc.returncode}")


def pack_init(ref: str, folder: Path) -> str:
    """Put the starting point `ref` into `folder` (BUNDLE/init); returns the bundle's `init_from`.

    An installed model id travels with the source checkout and costs nothing; a model directory is copied
    (weights only, from step 0, as `init_from` does); a training checkpoint (a `.pt` file, a run directory,
    a `bundle_run` output) becomes a portable checkpoint: step, optimisers and EMA carry over."""
    from codec.presets import MODELS
    from training import checkpoints
    from training.export import export
    from training.portable import save_portable

    if ref in MODELS:
        return ref
    path = Path(ref)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        folder.mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            shutil.copy2(path / name, folder / name)
        return "init"
    checkpoint = checkpoints.resolve_checkpoint(path)
    export(checkpoint, folder / "model", dtype=torch.float16)
    save_portable(checkpoints.load_checkpoint(checkpoint), folder, ema_dir=folder / "model")
    return "init/checkpoint.json"


def pack(
    corpus: Path,
    out: Path,
    cfg: TrainConfig,
    kbps: float = DEFAULT_KBPS,
    max_bytes: int = 40 * 2**20,
    init: str | None = None,
    wheels: bool = False,
    min_hours: float = 0.25,
    jobs: int | None = None,
    force: bool = False,
    log=print,
) -> BundleSummary:
    """Write the bundle of `corpus` for `cfg` into `out` (created whole, or not at all).

    Args:
        corpus: a corpus folder (`train.csv`, `dev.csv`), a manifest or a folder of audio.
        out: the bundle folder; an existing one is replaced only with `force` (and only if it is a bundle).
        cfg: the training config (its data paths are replaced by the bundle's); the dev clips come from the
            corpus, the out-of-domain ones from `data.dev_ood` where it is set.
        kbps: Opus bitrate.
        max_bytes: the cap on the whole bundle.
        init: a starting point (`pack_init`); None takes the config's `init_from`, "" starts from scratch.
        wheels: download the wheels the GPU run needs.
        min_hours: refuse when less training audio than this fits.
        jobs: encoding threads (default: the CPU count).
        log: where progress lines go.
    """
    from codec.model import SimVQCodec

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise BundleError(f"{out} exists and is not empty: pass --force to replace a bundle there")
        read_bundle(out)  # replace only a bundle, never an arbitrary folder
    opus_level(kbps)
    train, dev = corpus_items(corpus, cfg.data.dev_fraction)
    ood = load_dev_ood(cfg.data.dev_ood) if cfg.data.dev_ood else []
    model = SimVQCodec(**cfg.model)
    rate = model.sample_rate
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "train").mkdir(parents=True)
    try:
        wheel_bytes = 0
        if wheels:
            download_wheels(tmp / "wheels")
            wheel_bytes = _size(tmp / "wheels")
            log(f"wheels: {wheel_bytes / 2**20:.1f} MiB ({', '.join(WHEELS)}) for CPython {WHEEL_PYTHON}")
        init = cfg.init_from if init is None else init
        init_from = pack_init(init, tmp / "init") if init else ""
        init_bytes = _size(tmp / "init")

        clips = (rate, model.hop_length, cfg.data.dev_clips, cfg.data.dev_clip_samples)
        dev_rows = _pack_dev(dev_clip_audio(dev, *clips), tmp / "dev", rate, kbps)
        ood_rows = _pack_dev(dev_clip_audio(ood, *clips), tmp / "dev-ood", rate, kbps) if ood else []
        fixed = _size(tmp) + (len(dev_rows) + len(ood_rows)) * ROW_BYTES + 8192  # + config.yaml and bundle.json
        room = max_bytes - fixed
        corpus_hours = sum(_seconds(item) for item in train) / 3600
        estimate = room / (kbps * 125.0) / 3600 if room > 0 else 0.0
        if estimate < min_hours:
            raise BundleError(
                f"nothing sensible fits: wheels {wheel_bytes / 2**20:.1f} MiB, init {init_bytes / 2**20:.1f} MiB and "
                f"dev {(fixed - wheel_bytes - init_bytes) / 2**20:.1f} MiB leave room for about {estimate:.2f} h of "
                f"{kbps:g} kbit/s speech under --max-mb {max_bytes / 2**20:g}, less than --min-hours {min_hours:g}; "
                "raise --max-mb, lower --kbps or --min-hours, or leave out --init/--wheels"
            )
        train_rows, used = _pack_train(speaker_order(train), tmp / "train", rate, kbps, room, jobs or os.cpu_count())
        hours = sum(row[2] for row in train_rows) / 3600
        if hours < min_hours:
            raise BundleError(
                f"only {hours:.2f} h of speech fit under --max-mb {max_bytes / 2**20:g} (--min-hours "
                f"{min_hours:g}): raise --max-mb or lower --kbps"
            )

        _write_rows(tmp / "train.csv", train_rows)
        _write_rows(tmp / "dev.csv", dev_rows)
        if ood_rows:
            _write_rows(tmp / "dev-ood.csv", ood_rows)
        cfg.data.train, cfg.data.dev, cfg.init_from = "train.csv", "dev.csv", init_from
        cfg.data.dev_ood = "dev-ood.csv" if ood_rows else None
        dump_config(cfg, tmp / "config.yaml")
        seconds = sum(row[2] for row in train_rows + dev_rows + ood_rows)
        audio_bytes = _size(tmp / "train") + _size(tmp / "dev") + _size(tmp / "dev-ood")
        summary = {
            "format": BUNDLE_FORMAT,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "corpus": str(Path(corpus).resolve()),
            "sample_rate": rate,
            "opus_kbps": kbps,
            "measured_kbps": round(audio_bytes * 8 / seconds / 1000, 2),
            "train": {
                "files": len(train_rows),
                "hours": round(hours, 3),
                "speakers": sorted({row[1] for row in train_rows}),
                "corpus_files": len(train),
                "corpus_hours": round(corpus_hours, 3),
            },
            "dev": _clips_summary(dev_rows),
            **({"dev-ood": _clips_summary(ood_rows)} if ood_rows else {}),
            "init_from": init_from,
            "wheels": sorted(p.name for p in (tmp / "wheels").glob("*.whl")),
            "wheel_python": WHEEL_PYTHON if wheels else None,
        }
        (tmp / "bundle.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        size = _size(tmp)
        if size > max_bytes:  # the manifests and config outgrew their allowance: never expected
            raise BundleError(f"the bundle came to {size / 2**20:.1f} MiB, over --max-mb {max_bytes / 2**20:g}")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return BundleSummary(
        out,
        size,
        len(train_rows),
        hours,
        len(summary["train"]["speakers"]),
        len(train),
        corpus_hours,
        len(dev_rows),
        len(ood_rows),
        summary["measured_kbps"],
        wheel_bytes,
        init_bytes,
    )


def _pack_dev(
    clips: list[tuple[AudioItem, np.ndarray]], folder: Path, rate: int, kbps: float
) -> list[tuple[str, str, float]]:
    """Encode dev clips (`dev_clip_audio`) into `folder`; returns their manifest rows."""
    folder.mkdir()
    rows = []
    for i, (item, audio) in enumerate(clips):
        write_opus(folder / f"{i:04d}.opus", audio, rate, kbps)
        rows.append((f"{folder.name}/{i:04d}.opus", item.speaker, len(audio) / rate))
    return rows


def _clips_summary(rows: list[tuple[str, str, float]]) -> dict:
    return {"clips": len(rows), "speakers": sorted({row[1] for row in rows})}


def _pack_train(
    items: list[AudioItem], folder: Path, rate: int, kbps: float, room: int, jobs: int
) -> tuple[list[tuple[str, str, float]], int]:
    """Encode `items` in order into `folder` until the next file would not fit in `room` bytes."""

    def encode(index: int) -> tuple[Path, int]:
        audio = decode(items[index].path, rate)
        path = folder / f"{index:06d}.opus"
        write_opus(path, audio, rate, kbps)
        return path, len(audio)

    rows, used = [], 0
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        pending = deque(pool.submit(encode, i) for i in range(min(len(items), 4 * jobs)))
        submitted = len(pending)
        while pending:
            path, samples = pending.popleft().result()
            size = path.stat().st_size + ROW_BYTES
            if used + size > room:
                for future in pending:
                    future.cancel()
                break
            used += size
            rows.append((f"train/{path.name}", items[int(path.stem)].speaker, samples / rate))
            if submitted < len(items):
                pending.append(pool.submit(encode, submitted))
                submitted += 1
    kept = {Path(row[0]).name for row in rows}
    for path in folder.iterdir():  # encoded ahead but past the budget
        if path.name not in kept:
            path.unlink()
    return rows, used


def _write_rows(path: Path, rows: list[tuple[str, str, float]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "speaker", "duration"])
        writer.writerows((name, speaker, f"{seconds:.4f}") for name, speaker, seconds in rows)


def _seconds(item: AudioItem) -> float:
    return item.duration if item.duration is not None else sf.info(str(item.path)).duration


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
