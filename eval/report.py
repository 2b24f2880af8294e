"""Write an evaluation's results: results.json, results.csv, report.md and rate-quality / utilisation plots."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, fields
from pathlib import Path

from eval.run import EvalResult, Row, setting_label

PLOTS = {"pesq_wb": "pesq_wb_vs_kbps.png", "stoi": "stoi_vs_kbps.png"}
USAGE_PLOT = "stage_utilisation.png"
_LABELS = {"pesq_wb": "PESQ-WB", "stoi": "STOI"}
NO_KIND = "(no kind)"
"""The by-kind column of the files whose manifest names no kind (beside files whose manifest does)."""


def strict_json(value):
    """NaN/inf -> None so that results.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    return value


def write_json(result: EvalResult, path: Path) -> None:
    data = {
        "config": result.config,
        "skipped": result.skipped,
        "failed_files": result.failed_files,
        "averages": [asdict(r) for r in result.averages],
        "rows": [asdict(r) for r in result.rows],
        "codebook_usage": {k: [asdict(u) for u in v] for k, v in result.usage.items()},
        "by_kind": kind_means(result),
    }
    path.write_text(json.dumps(strict_json(data), indent=1, allow_nan=False) + "\n")


def kind_means(result: EvalResult) -> dict[str, dict[str, dict]]:
    """{setting label: {kind: {pesq_wb, stoi, files}}} from the by-kind MEAN rows; empty with under two kinds."""
    table: dict[str, dict[str, dict]] = {}
    for r in result.by_kind:
        table.setdefault(setting_label(r), {})[r.kind or NO_KIND] = {
            "pesq_wb": r.pesq_wb,
            "stoi": r.stoi,
            "files": r.files,
        }
    return table


def write_csv(result: EvalResult, path: Path) -> None:
    """One line per file x codec x setting, then the MEAN line of each setting; a `kind` column when any file has
    a kind."""
    names = [f.name for f in fields(Row)]
    if not any(r.kind for r in result.rows):
        names.remove("kind")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
        writer.writeheader()
        for row in [*result.rows, *result.averages]:
            writer.writerow(
                {
                    k: ("" if isinstance(v, float) and math.isnan(v) else round(v, 4) if isinstance(v, float) else v)
                    for k, v in asdict(row).items()
                }
            )


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def markdown(result: EvalResult, plots: list[str] = ()) -> str:
    """The report: one line per codec setting (MEAN over the files), skipped codecs, notes, codebook use."""
    cfg = result.config
    seconds = cfg.get("seconds", 0.0)
    out = [
        "# Evaluation report",
        "",
        f"{cfg.get('files', 0)} files ({seconds:.1f} s of audio), scored at 16 kHz after delay alignment "
        f"(search +-{cfg.get('max_delay_ms', 100):g} ms). kbps is from the actual compressed bytes "
        "(payload: without container/header bytes); x RT is audio seconds per wall second "
        f"({cfg.get('jobs', 1)} job(s)).",
    ]
    if cfg.get("sources"):
        out += ["", "Inputs: " + ", ".join(f"`{s}`" for s in cfg["sources"])]
    nb = cfg.get("pesq_nb")
    head = [
        "codec",
        "setting",
        "kbps",
        "payload kbps",
        "PESQ-WB",
        *(["PESQ-NB"] if nb else []),
        "STOI",
        "ESTOI",
        "SI-SDR dB",
        "mel dist",
        "delay ms",
        "enc x RT",
        "dec x RT",
        "files",
    ]
    out += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in _table_order(result):
        cells = [
            r.codec,
            r.setting,
            _fmt(r.kbps),
            _fmt(r.payload_kbps),
            _fmt(r.pesq_wb),
            *([_fmt(r.pesq_nb)] if nb else []),
            _fmt(r.stoi, 3),
            _fmt(r.estoi, 3),
            _fmt(r.si_sdr, 1),
            _fmt(r.mel_distance, 3),
            _fmt(r.delay_ms, 1),
            _fmt(r.encode_x_realtime, 0),
            _fmt(r.decode_x_realtime, 0),
            str(r.files),
        ]
        out.append("| " + " | ".join(cells) + " |")
    out += _by_kind_table(result)
    if result.skipped:
        out += ["", "## Skipped codecs", ""] + [f"- {c}: {why}" for c, why in result.skipped.items()]
    if result.failed_files:
        out += ["", "## Files that could not be read", ""]
        out += [f"- `{f}`: {why}" for f, why in result.failed_files.items()]
    notes = [r for r in result.averages if r.notes]
    if notes:
        out += ["", "## Notes", ""] + [f"- {r.codec} {r.setting}: {r.notes}" for r in notes]
    if result.usage:
        # Stage i's codes do not depend on later stages, so the setting with the most stages shows them all.
        label, usage = _widest_usage(result)
        out += [
            "",
            f"## Codebook use over the set: {label}",
            "",
            "| stage | used / K | utilisation | perplexity |",
            "|---|---|---|---|",
        ]
        out += [
            f"| {u.stage} | {u.used} / {u.codebook_size} | {100 * u.utilisation:.1f}% | {_fmt(u.perplexity, 1)} |"
            for u in usage
        ]
    if plots:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def _table_order(result: EvalResult) -> list[Row]:
    """The MEAN rows in report order: codecs as configured, each by bitrate."""
    return sorted(result.averages, key=lambda r: (_codec_order(result, r.codec), r.kbps))


def _by_kind_table(result: EvalResult) -> list[str]:
    """The "By kind of speech" section's lines (none with under two kinds): PESQ-WB / STOI per setting and kind."""
    table = kind_means(result)
    if not table:
        return []
    files: dict[str, int] = {}
    for cells in table.values():
        for kind, cell in cells.items():
            files[kind] = max(files.get(kind, 0), cell["files"])
    out = [
        "",
        "## By kind of speech",
        "",
        "PESQ-WB / STOI means over the files of each kind (each metric over the files where it is defined).",
        "",
        "| codec | setting | " + " | ".join(f"{kind} ({n} file{'s' * (n != 1)})" for kind, n in files.items()) + " |",
        "|" + "---|" * (2 + len(files)),
    ]
    for r in _table_order(result):
        cells = table.get(setting_label(r), {})
        values = [cells.get(kind) for kind in files]
        out.append(
            f"| {r.codec} | {r.setting} | "
            + " | ".join(f"{_fmt(v['pesq_wb'])} / {_fmt(v['stoi'], 3)}" if v else "" for v in values)
            + " |"
        )
    return out


def _widest_usage(result: EvalResult):
    return max(result.usage.items(), key=lambda kv: len(kv[1]))


def _codec_order(result: EvalResult, codec: str) -> int:
    names = [c["codec"] for c in result.config.get("codecs", [])]
    return names.index(codec) if codec in names else len(names)


def _plot_rate_quality(result: EvalResult, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    codecs = sorted({r.codec for r in result.averages}, key=lambda c: _codec_order(result, c))
    for codec in codecs:
        pts = sorted(
            (r.kbps, getattr(r, metric), r.setting)
            for r in result.averages
            if r.codec == codec and not math.isnan(r.kbps) and not math.isnan(getattr(r, metric))
        )
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=codec)
        for x, y, setting in pts:
            ax.annotate(setting, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("kbit/s (actual file bytes)")
    ax.set_ylabel(_LABELS[metric])
    ax.set_title(f"{_LABELS[metric]} vs bitrate ({result.config.get('files', 0)} files)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_usage(result: EvalResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, usage = _widest_usage(result)
    stages = [u.stage for u in usage]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.0), sharex=True)
    top.bar(stages, [100 * u.utilisation for u in usage], color="tab:blue")
    top.set_ylabel("codes used (%)")
    top.set_ylim(0, 105)
    top.set_title(f"Codebook use per stage: {label}")
    bottom.bar(stages, [u.perplexity for u in usage], color="tab:orange")
    bottom.axhline(usage[0].codebook_size, color="grey", linestyle="--", linewidth=1, label="K (uniform use)")
    bottom.set_ylabel("perplexity")
    bottom.set_xlabel("stage")
    bottom.set_xticks(stages)
    bottom.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: EvalResult, out_dir: Path, plots: bool = True) -> list[Path]:
    """Write every output file into ``out_dir`` (created if needed); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.json", out_dir / "results.csv"]
    write_json(result, written[0])
    write_csv(result, written[1])
    names: list[str] = []
    if plots and result.averages:
        for metric, name in PLOTS.items():
            _plot_rate_quality(result, metric, out_dir / name)
            names.append(name)
        if result.usage:
            _plot_usage(result, out_dir / USAGE_PLOT)
            names.append(USAGE_PLOT)
    (out_dir / "report.md").write_text(markdown(result, names))
    return [*written, out_dir / "report.md", *(out_dir / n for n in names)]
