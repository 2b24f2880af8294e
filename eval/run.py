"""Run every codec setting over every file, score it, and gather rows, averages and codebook use."""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from codec.errors import CodecError
from codec.manifest import AudioItem
from eval import SAMPLE_RATE
from eval.dataset import load_audio
from eval.metrics import METRICS, score
from eval.model import ModelSetting, StageUsage, count_codes, stage_usage
from eval.peers import PeerError, missing_tools

MEAN = "MEAN"
"""The ``file`` of the average row of each codec setting."""


@dataclass
class Row:
    """One file x codec x setting (or, with ``file == MEAN``, the average of a setting over the set).

    ``kbps`` is from the actual compressed bytes, ``payload_kbps`` without container/header bytes,
    ``nominal_kbps`` the codec's target; ``*_x_realtime`` = audio seconds / wall seconds (higher is faster).
    In a MEAN row the bitrates and speeds are totals over the set (bits / seconds), the metrics are means
    over the files where they are defined and ``files`` counts the files. ``kind`` is the file's kind of
    speech from its manifest (None when it has none); a MEAN row has the kind its files share, else None.
    """

    file: str
    kind: str | None = field(default=None, kw_only=True)
    codec: str
    setting: str
    seconds: float
    nominal_kbps: float
    kbps: float
    payload_kbps: float
    pesq_wb: float
    pesq_nb: float
    stoi: float
    estoi: float
    si_sdr: float
    mel_distance: float
    delay_ms: float
    encode_x_realtime: float
    decode_x_realtime: float
    files: int = 1
    notes: str = ""


@dataclass
class EvalResult:
    """Everything a report needs: per-file rows, one MEAN row per setting, codec settings skipped (tool
    missing: ``"codec": reason``), files that could not be read, per-stage codebook use per model setting
    (keyed by `setting_label`), and when the files hold two kinds of speech or more, ``by_kind``: one MEAN row
    per setting and kind (the files without a kind together, ``kind`` None)."""

    rows: list[Row]
    averages: list[Row]
    skipped: dict[str, str] = field(default_factory=dict)
    failed_files: dict[str, str] = field(default_factory=dict)
    usage: dict[str, list[StageUsage]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    by_kind: list[Row] = field(default_factory=list)


@dataclass
class _FileResult:
    rows: list[Row]
    counts: dict[str, list[np.ndarray]]
    seconds: float = 0.0
    error: str | None = None


def setting_label(codec) -> str:
    """The name of a codec setting (or of a Row's), e.g. "simvq-16k 12st"."""
    return f"{codec.codec} {codec.setting}"


def _evaluate_file(item: AudioItem, codecs: list, max_delay_ms: float, pesq_nb: bool) -> _FileResult:
    try:
        wav = load_audio(item.path)
    except CodecError as exc:
        return _FileResult([], {}, error=str(exc))
    seconds = wav.size / SAMPLE_RATE
    rows, counts = [], {}
    for codec in codecs:
        base = dict(
            file=item.key,
            kind=item.kind,
            codec=codec.codec,
            setting=codec.setting,
            seconds=seconds,
            nominal_kbps=codec.nominal_kbps,
        )
        try:
            run = codec.run(wav)
        except (PeerError, CodecError) as exc:
            nan = {
                k: math.nan
                for k in ("kbps", "payload_kbps", "delay_ms", "encode_x_realtime", "decode_x_realtime", *METRICS)
            }
            rows.append(Row(**base, **nan, notes=f"failed: {exc}"))
            continue
        s = score(wav, run.decoded, max_delay_ms=max_delay_ms, pesq_nb=pesq_nb)
        notes = "; ".join(f"{k}: {v}" for k, v in s.notes.items() if v != "not requested")
        rows.append(
            Row(
                **base,
                kbps=run.num_bytes * 8 / seconds / 1000,
                payload_kbps=math.nan if run.payload_bytes is None else run.payload_bytes * 8 / seconds / 1000,
                pesq_wb=s.pesq_wb,
                pesq_nb=s.pesq_nb,
                stoi=s.stoi,
                estoi=s.estoi,
                si_sdr=s.si_sdr,
                mel_distance=s.mel_distance,
                delay_ms=s.delay_ms,
                encode_x_realtime=seconds / max(run.encode_seconds, 1e-9),
                decode_x_realtime=seconds / max(run.decode_seconds, 1e-9),
                notes=notes,
            )
        )
        if run.codes is not None and isinstance(codec, ModelSetting):
            counts[setting_label(codec)] = count_codes(run.codes, codec.codebook_sizes)
    return _FileResult(rows, counts, seconds)


def group_by_kind(items: list, kind_of) -> dict[str | None, list]:
    """``items`` grouped by their kind of speech (``kind_of(item)``, None for none): kinds sorted, None last."""
    groups: dict[str | None, list] = {}
    for item in items:
        groups.setdefault(kind_of(item), []).append(item)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or "")))


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _mean_row(rows: list[Row]) -> Row:
    total = sum(r.seconds for r in rows)
    ok = [r for r in rows if not math.isnan(r.kbps)]
    ok_seconds = sum(r.seconds for r in ok)

    def rate(attr: str) -> float:
        values = [r for r in ok if not math.isnan(getattr(r, attr))]
        secs = sum(r.seconds for r in values)
        return sum(getattr(r, attr) * r.seconds for r in values) / secs if secs else math.nan

    def speed(attr: str) -> float:
        spent = sum(r.seconds / getattr(r, attr) for r in ok)
        return ok_seconds / spent if spent else math.nan

    def mean(attr: str) -> tuple[float, int]:
        values = [getattr(r, attr) for r in rows if not math.isnan(getattr(r, attr))]
        return (float(np.mean(values)) if values else math.nan), len(values)

    metrics, missing = {}, []
    for name in (*METRICS, "delay_ms"):
        metrics[name], n = mean(name)
        if n < len(rows) and not (name == "pesq_nb" and n == 0):
            missing.append(f"{name} undefined for {len(rows) - n}/{len(rows)} files")
    first = rows[0]
    return Row(
        file=MEAN,
        kind=first.kind if all(r.kind == first.kind for r in rows) else None,
        codec=first.codec,
        setting=first.setting,
        seconds=total,
        nominal_kbps=first.nominal_kbps,
        kbps=rate("kbps"),
        payload_kbps=rate("payload_kbps"),
        **metrics,
        encode_x_realtime=speed("encode_x_realtime"),
        decode_x_realtime=speed("decode_x_realtime"),
        files=len(rows),
        notes="; ".join(missing),
    )


def evaluate(
    items: list[AudioItem],
    codecs: list,
    jobs: int | None = None,
    max_delay_ms: float = 100.0,
    pesq_nb: bool = False,
    progress: bool = True,
    tool_path: str | None = None,
) -> EvalResult:
    """Score every codec setting in ``codecs`` on every file in ``items``.

    Args:
        items: the inputs (see :func:`eval.dataset.list_inputs`).
        codecs: peer settings (:mod:`eval.peers`) and model settings (:mod:`eval.model`), in report order.
        jobs: worker processes over files (default: CPU count; 1 runs in this process). The model runs on
            one torch thread either way, like the peer tools. Speeds measured with several jobs share the CPU,
            so use ``jobs=1`` for speed figures.
        max_delay_ms: the alignment search bound.
        pesq_nb: also score narrowband PESQ.
        progress: a progress bar over files on stderr.
        tool_path: the PATH searched for the peer tools (default: $PATH).
    """
    skipped: dict[str, str] = {}
    runnable = []
    for codec in codecs:
        missing = missing_tools(codec, tool_path)
        if missing:
            skipped[codec.codec] = f"{', '.join(missing)} not found on PATH"
        else:
            runnable.append(codec)
    if not runnable:
        items = []  # every codec was skipped: nothing to read or score
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(items)))
    results: dict[int, _FileResult] = {}
    bar = tqdm(total=len(items), unit="file", desc="eval", disable=not progress, file=sys.stderr)
    if jobs == 1:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # like the workers, and like the single-threaded peer tools
        try:
            for i, item in enumerate(items):
                results[i] = _evaluate_file(item, runnable, max_delay_ms, pesq_nb)
                bar.update()
        finally:
            torch.set_num_threads(threads)
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as pool:
            futures = {
                pool.submit(_evaluate_file, item, runnable, max_delay_ms, pesq_nb): i for i, item in enumerate(items)
            }
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    bar.close()

    rows: list[Row] = []
    failed: dict[str, str] = {}
    counts: dict[str, list[np.ndarray]] = {}
    for i in range(len(items)):
        res = results[i]
        if res.error:
            failed[items[i].key] = res.error
        rows += res.rows
        for label, c in res.counts.items():
            counts[label] = [a + b for a, b in zip(counts[label], c)] if label in counts else c
    averages, by_kind = [], []
    split_kinds = len({r.kind for r in rows} - {None}) > 1
    for codec in runnable:
        mine = [r for r in rows if (r.codec, r.setting) == (codec.codec, codec.setting)]
        if mine:
            averages.append(_mean_row(mine))
        if split_kinds:
            by_kind += [_mean_row(group) for group in group_by_kind(mine, lambda r: r.kind).values()]
    config = {
        "files": len(items) - len(failed),
        "seconds": sum(r.seconds for r in results.values()),
        "codecs": [{"codec": c.codec, "setting": c.setting, "nominal_kbps": c.nominal_kbps} for c in codecs],
        "jobs": jobs,
        "max_delay_ms": max_delay_ms,
        "pesq_nb": pesq_nb,
    }
    usage = {k: stage_usage(v) for k, v in counts.items()}
    return EvalResult(rows, averages, skipped, failed, usage, config, by_kind)
