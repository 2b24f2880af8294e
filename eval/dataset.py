"""Evaluation inputs: a folder scanned for audio or a corpus manifest CSV, loaded as 16 kHz mono float."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from codec.errors import AudioError
from eval import SAMPLE_RATE

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
MANIFEST_COLUMNS = ("path", "speaker", "duration", "split", "source", "language")


@dataclass(frozen=True)
class Item:
    """One input file: ``path`` on disk and ``name`` as shown in reports (relative to its folder or manifest)."""

    path: Path
    name: str
    speaker: str = ""
    split: str = ""


def scan_folder(folder: Path) -> list[Item]:
    """Every wav/flac/ogg file under ``folder`` (recursively), sorted by relative path."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    return [Item(path=p, name=p.relative_to(folder).as_posix()) for p in files]


def read_manifest(csv_path: Path, split: str | None = None) -> list[Item]:
    """The rows of a corpus manifest (columns ``path,speaker,duration,split,source,language``).

    Paths are relative to the CSV's folder; ``split`` keeps only rows of that split.
    """
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise AudioError(f"{csv_path}: a manifest needs a 'path' column (expected {','.join(MANIFEST_COLUMNS)})")
        if split is not None and "split" not in reader.fieldnames:
            raise AudioError(f"{csv_path}: --split {split} given but the manifest has no 'split' column")
        rows = list(reader)
    items = []
    for row in rows:
        if split is not None and row.get("split") != split:
            continue
        rel = row["path"]
        items.append(Item(path=csv_path.parent / rel, name=rel, speaker=row.get("speaker") or "",
                          split=row.get("split") or ""))
    missing = [it for it in items if not it.path.is_file()]
    if missing:
        raise AudioError(f"{csv_path}: {len(missing)} listed file(s) do not exist, e.g. {missing[0].path}")
    return items


def spread_per_speaker(items: list[Item], n: int) -> list[Item]:
    """At most ``n`` files per speaker, evenly spaced through each speaker's files, in the original order.

    The speaker is the manifest's column, or a scanned file's folder. A fixed, deterministic subset that keeps
    every voice: a large dev set scores in minutes, and two runs score the same files."""
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.speaker or Path(it.name).parent.as_posix(), []).append(i)
    keep = set()
    for idx in groups.values():
        step = len(idx) / min(n, len(idx))
        keep.update(idx[int(j * step)] for j in range(min(n, len(idx))))
    return [it for i, it in enumerate(items) if i in keep]


def list_inputs(sources: list[str | Path], split: str | None = None, limit: int | None = None,
                per_speaker: int | None = None) -> list[Item]:
    """Resolve folders and manifest CSVs into a list of files (``per_speaker`` files of each voice, then the
    first ``limit``, if given).

    A folder is scanned for wav/flac/ogg; ``split`` applies to manifests only.
    """
    items: list[Item] = []
    for source in sources:
        src = Path(source)
        if src.is_dir():
            found = scan_folder(src)
            if len(sources) > 1:
                found = [Item(it.path, f"{src.name}/{it.name}") for it in found]
        elif src.is_file() and src.suffix.lower() == ".csv":
            found = read_manifest(src, split)
        elif src.is_file() and src.suffix.lower() in AUDIO_SUFFIXES:
            found = [Item(path=src, name=src.name)]
        else:
            raise AudioError(f"{src}: not a folder, a manifest .csv or a wav/flac/ogg file")
        items += found
    if not items:
        raise AudioError(f"no audio found in {', '.join(map(str, sources))}" + (f" (split {split})" if split else ""))
    if per_speaker:
        items = spread_per_speaker(items, per_speaker)
    return items[:limit] if limit else items


def load_audio(path: Path) -> np.ndarray:
    """Read ``path`` as 16 kHz mono float32 [T] (channels averaged, resampled with soxr)."""
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioError(f"{path}: cannot read audio ({exc})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: no samples")
    mono = data.mean(axis=1)
    if not np.all(np.isfinite(mono)):
        raise AudioError(f"{path}: contains NaN or infinite samples")
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE).astype(np.float32)
    return mono
