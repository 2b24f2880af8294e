"""Corpus listings: the one reader of folder trees and manifests (a CSV with a `path` column, or one path per
line), for training, the tokenize job and evaluation."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from codec.errors import AudioError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")


@dataclass(frozen=True)
class AudioItem:
    """One audio file of a corpus.

    Args:
        path: absolute path of the file.
        speaker: speaker (voice) id: the manifest's `speaker` column, else guessed from the path
            (`speaker_from_path`); the dev split holds out whole speakers.
        duration: seconds, when known (a manifest's `duration` column; training reads a scanned folder's).
        split: "train", "dev", "test", ... when the manifest says, else None.
        key: the path as the listing wrote it: relative to the folder scanned, or as in the manifest.
        named_speaker: False when `speaker` is a guess from the path, not the manifest's.
    """

    path: Path
    speaker: str
    duration: float | None = None
    split: str | None = None
    key: str = ""
    named_speaker: bool = True


def speaker_from_path(path: Path, root: Path) -> str:
    """Guess a speaker id from a corpus path.

    LibriTTS (`19/198/19_198_000000_000000.wav`), LibriSpeech (`19/198/19-198-0000.flac`) and VCTK
    (`p225/p225_001_mic1.flac`) name files after their speaker's folder: the outermost folder whose name
    starts the file name (followed by `_` or `-`) is the speaker. Otherwise the file's folder is."""
    try:
        parents = path.relative_to(root).parts[:-1]
    except ValueError:
        parents = path.parts[-3:-1]
    for name in parents:
        if path.stem.startswith((name + "_", name + "-")):
            return name
    return parents[-1] if parents else (path.parent.name or "unknown")


def scan_folder(folder: str | os.PathLike) -> list[AudioItem]:
    """Every wav/flac/ogg file under `folder` (recursively), sorted by path; empty if there is none."""
    root = Path(folder).resolve()
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    return [
        AudioItem(p, speaker_from_path(p, root), key=p.relative_to(root).as_posix(), named_speaker=False) for p in files
    ]


def read_manifest(path: str | os.PathLike) -> list[AudioItem]:
    """The rows of a manifest: a CSV with a header naming a `path` column (and optionally `speaker`,
    `duration`, `split`; other columns are ignored), or a plain list of paths, one per line. Blank lines and
    lines starting with `#` are skipped; relative paths are relative to the manifest's folder."""
    path = Path(path)
    root = path.resolve().parent
    try:
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text or path.suffix.lower() in AUDIO_EXTENSIONS:
        what = "an audio file" if path.suffix.lower() in AUDIO_EXTENSIONS else "not a text file"
        raise AudioError(
            f"{path} is {what}, not a manifest: pass a folder of audio files or a manifest "
            "(a CSV with a path column, or one path per line)"
        )
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise AudioError(f"manifest {path} lists no files")
    header = [h.strip() for h in next(csv.reader([lines[0]]))]
    if "path" in header:
        rows = [
            {k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in csv.DictReader(lines)
        ]
    else:
        rows = [{"path": line.strip()} for line in lines]
    items = []
    for i, row in enumerate(rows):
        if not row.get("path"):
            raise AudioError(f"manifest {path}: row {i + 1} has an empty path")
        file = Path(row["path"])
        file = file if file.is_absolute() else (root / file).resolve()
        speaker = row.get("speaker") or ""
        items.append(
            AudioItem(
                file,
                speaker or speaker_from_path(file, root),
                float(row["duration"]) if row.get("duration") else None,
                row.get("split") or None,
                row["path"],
                named_speaker=bool(speaker),
            )
        )
    return items


def read_listing(source: str | os.PathLike) -> list[AudioItem]:
    """The files of a folder tree (at least one) or of a manifest; AudioError when there is neither."""
    source = Path(source)
    if source.is_dir():
        items = scan_folder(source)
        if not items:
            raise AudioError(f"no {'/'.join(e[1:] for e in AUDIO_EXTENSIONS)} files under {source}")
        return items
    if not source.is_file():
        raise AudioError(f"no folder or manifest at {source}")
    return read_manifest(source)
