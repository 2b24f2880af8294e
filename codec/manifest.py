"""Corpus listings: the one reader (and writer) of manifests and folder trees, for training, the corpus and
tokenize jobs and evaluation.

A manifest is a CSV whose header names a `path` column (the corpus job writes `MANIFEST_COLUMNS`; any other
columns are ignored), or a plain list of paths, one per line. Blank lines and lines starting with `#` are
skipped; relative paths are relative to the manifest's folder. A malformed row is an AudioError naming its
line.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from codec.errors import AudioError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
MANIFEST_COLUMNS = ("path", "speaker", "duration", "split", "source", "language", "kind")


@dataclass(frozen=True)
class ManifestRow:
    """One manifest row as written; a column the manifest lacks is empty (`duration` None).

    Args:
        path: the file, relative to the manifest's folder (the corpus job's rows always are) or absolute.
        speaker: speaker (voice) id.
        duration: seconds.
        split: "train", "dev", "dev-ood", ...
        source: the corpus source the file came from.
        language: BCP 47 tag such as `en-US`.
        kind: the kind of speech (`read`, `acted`, ...); empty in manifests written before the column existed.
    """

    path: str
    speaker: str = ""
    duration: float | None = None
    split: str = ""
    source: str = ""
    language: str = ""
    kind: str = ""


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
        kind: the kind of speech (`read`, `acted`, `telephone`, ...) when the manifest's `kind` column says,
            else None.
    """

    path: Path
    speaker: str
    duration: float | None = None
    split: str | None = None
    key: str = ""
    named_speaker: bool = True
    kind: str | None = None


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


def _text_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of every line that is neither blank nor a `#` comment."""
    if not path.is_file():
        raise AudioError(f"no manifest at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        text = None
    is_audio = path.suffix.lower() in AUDIO_EXTENSIONS
    if text is None or "\0" in text or is_audio:
        raise AudioError(
            f"{path} is {'an audio file' if is_audio else 'not a text file'}, not a manifest: pass a folder of "
            "audio files or a manifest (a CSV with a path column, or one path per line)"
        )
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    return [(n, line) for n, line in lines if not line.lstrip().startswith("#")]


def _row(path: Path, line_no: int, values: dict[str, str]) -> ManifestRow:
    where = f"{path}:{line_no}"
    if not values.get("path"):
        raise AudioError(f"{where}: empty path")
    duration = None
    if values.get("duration"):
        try:
            duration = float(values["duration"])
        except ValueError:
            raise AudioError(f"{where}: duration {values['duration']!r} is not a number") from None
        if not (duration > 0 and math.isfinite(duration)):
            raise AudioError(f"{where}: duration must be a positive number of seconds, got {values['duration']}")
    known = {k: values.get(k, "") for k in MANIFEST_COLUMNS if k not in ("path", "duration")}
    return ManifestRow(values["path"], duration=duration, **known)


def read_rows(path: str | os.PathLike) -> list[ManifestRow]:
    """The rows of a manifest, as written; AudioError naming the line of any malformed row."""
    path = Path(path)
    lines = _text_lines(path)
    if not lines:
        raise AudioError(f"manifest {path} lists no files")
    first_no, first = lines[0]
    header = [h.strip() for h in next(csv.reader([first]))]
    if "path" not in header:
        if len(header) > 1:  # a CSV whose header misses the column, not a path
            raise AudioError(f"{path}:{first_no}: a CSV manifest's header must name a path column, got {first}")
        return [_row(path, n, {"path": line.strip()}) for n, line in lines]
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:
        raise AudioError(f"{path}:{first_no}: column(s) {', '.join(twice)} named twice in the header")
    rows = []
    for line_no, line in lines[1:]:
        values = next(csv.reader([line]))
        if len(values) != len(header):
            raise AudioError(f"{path}:{line_no}: expected {len(header)} columns, got {len(values)}")
        rows.append(_row(path, line_no, {k: v.strip() for k, v in zip(header, values)}))
    if not rows:
        raise AudioError(f"manifest {path} lists no files")
    return rows


def read_manifest(path: str | os.PathLike) -> list[AudioItem]:
    """The files of a manifest (`read_rows`), paths resolved, missing speakers guessed from the path."""
    root = Path(path).resolve().parent
    items = []
    for row in read_rows(path):
        file = Path(row.path)
        file = file if file.is_absolute() else (root / file).resolve()
        speaker = row.speaker or speaker_from_path(file, root)
        items.append(
            AudioItem(file, speaker, row.duration, row.split or None, row.path, bool(row.speaker), row.kind or None)
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


def write_manifest(path: Path, rows: Iterable[ManifestRow]) -> int:
    """Write rows (sorted by path) as CSV with the `MANIFEST_COLUMNS` header; returns the row count."""
    rows = sorted(rows, key=lambda r: r.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for r in rows:
            duration = "" if r.duration is None else f"{r.duration:.3f}"
            writer.writerow([r.path, r.speaker, duration, r.split, r.source, r.language, r.kind])
    tmp.replace(path)
    return len(rows)
