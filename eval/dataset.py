"""Evaluation inputs: a folder scanned for audio or a corpus manifest CSV, loaded as 16 kHz mono float.

The files are `codec.manifest.AudioItem`s; `key` is a file's name in reports (relative to its folder or manifest)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from codec.audio import read_audio
from codec.errors import AudioError
from codec.manifest import AUDIO_EXTENSIONS, AudioItem, read_manifest, scan_folder
from eval import SAMPLE_RATE


def manifest_items(csv_path: Path, split: str | None = None) -> list[AudioItem]:
    """The rows of a corpus manifest (`codec.manifest.read_manifest`); ``split`` keeps only rows of that
    split. AudioError when a listed file does not exist."""
    items = read_manifest(csv_path)
    if split is not None:
        if all(it.split is None for it in items):
            raise AudioError(f"{csv_path}: --split {split} given but the manifest has no 'split' column")
        items = [it for it in items if it.split == split]
    missing = [it for it in items if not it.path.is_file()]
    if missing:
        raise AudioError(f"{csv_path}: {len(missing)} listed file(s) do not exist, e.g. {missing[0].path}")
    return items


def spread_per_speaker(items: list[AudioItem], n: int) -> list[AudioItem]:
    """At most ``n`` files per speaker, evenly spaced through each speaker's files, in the original order.

    The speaker is the manifest's column, or a scanned file's folder. A fixed, deterministic subset that keeps
    every voice: a large dev set scores in minutes, and two runs score the same files."""
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.speaker if it.named_speaker else Path(it.key).parent.as_posix(), []).append(i)
    keep = set()
    for idx in groups.values():
        step = len(idx) / min(n, len(idx))
        keep.update(idx[int(j * step)] for j in range(min(n, len(idx))))
    return [it for i, it in enumerate(items) if i in keep]


def list_inputs(
    sources: list[str | Path], split: str | None = None, limit: int | None = None, per_speaker: int | None = None
) -> list[AudioItem]:
    """Resolve folders and manifest CSVs into a list of files (``per_speaker`` files of each voice, then the
    first ``limit``, if given).

    A folder is scanned for wav/flac/ogg; ``split`` applies to manifests only.
    """
    items: list[AudioItem] = []
    for source in sources:
        src = Path(source)
        if src.is_dir() or (src.is_file() and src.suffix.lower() == ".csv"):
            found = scan_folder(src) if src.is_dir() else manifest_items(src, split)
            if len(sources) > 1:  # a file's key names its folder or manifest, as two of them may share paths
                found = [replace(it, key=f"{src.name}/{it.key}") for it in found]
        elif src.is_file() and src.suffix.lower() in AUDIO_EXTENSIONS:
            found = [AudioItem(src.resolve(), src.parent.name, key=src.name, named_speaker=False)]
        else:
            raise AudioError(f"{src}: not a folder, a manifest .csv or a wav/flac/ogg file")
        items += found
    if not items:
        raise AudioError(f"no audio found in {', '.join(map(str, sources))}" + (f" (split {split})" if split else ""))
    twice = next((key for key, n in Counter(it.key for it in items).items() if n > 1), None)
    if twice is not None:  # results and eval-compare pair files by key
        raise AudioError(
            f"{twice} is given twice (files are named by their path in their folder or manifest): score them apart"
        )
    if per_speaker:
        items = spread_per_speaker(items, per_speaker)
    return items[:limit] if limit else items


def load_audio(path: Path) -> np.ndarray:
    """Read ``path`` as 16 kHz mono float32 [T] (`codec.audio.read_audio`: channels averaged, resampled with
    soxr; empty, truncated or non-finite audio refused)."""
    return read_audio(path, SAMPLE_RATE)[0]
