"""Report of the collapse study: collapse.json, collapse.csv, collapse.md and PNG plots of the runs' dev curves."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from eval.report import strict_json  # NaN/inf -> None

CURVES_PLOT = "utilisation_vs_step.png"
INIT_PLOT = "init_scale.png"
COLUMNS = (
    "name",
    "quantizer",
    "whiten",
    "codebook_size",
    "init_scale",
    "init_from_data",
    "steps",
    "frames",
    "used",
    "utilisation",
    "ceiling",
    "peak_utilisation",
    "perplexity",
    "perplexity_per_k",
    "latent_rank",
    "codebook_rank",
    "latent_rms",
    "codebook_rms",
    "mel",
    "train_seconds",
)


def uniform_coverage(frames: int, k: int) -> float:
    """Expected utilisation if each of `frames` frames picked one of K codes uniformly: 1 - (1 - 1/K)^frames.

    The ceiling a finite dev set puts on utilisation: 0.63 when frames = K, 0.95 when frames = 3 K."""
    return -math.expm1(frames * math.log1p(-1.0 / k)) if k > 1 else 1.0


def final_row(summary: dict) -> dict:
    """The table line of one run: its last dev measurement, and the best utilisation it reached on the way."""
    last = summary["curve"][-1]
    k = summary["codebook_size"]
    return {
        "name": summary["name"],
        "quantizer": summary["quantizer"],
        "whiten": summary.get("whiten", False),  # studies from before the whitening option
        "codebook_size": k,
        "init_scale": summary["init_scale"],
        "init_from_data": summary["init_from_data"],
        "steps": last["step"],
        "frames": last["frames"],
        "used": last["used"],
        "utilisation": last["utilisation"],
        "ceiling": uniform_coverage(last["frames"], k),
        "peak_utilisation": max([r["utilisation"] for r in summary["curve"] if r["step"] > 0] or [last["utilisation"]]),
        "perplexity": last["perplexity"],
        "perplexity_per_k": last["perplexity"] / k,
        "latent_rank": last["latent_rank"],
        "codebook_rank": last["codebook_rank"],
        "latent_rms": last["latent_rms"],
        "codebook_rms": last["codebook_rms"],
        "mel": last["mel"],
        "train_seconds": summary["train_seconds"],
    }


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _is_main(row: dict) -> bool:
    return row["init_scale"] == 1.0 and row["init_from_data"]


def _label(run: dict) -> str:
    """ "simvq" or "simvq + whitening" (a summary or a table row)."""
    return run["quantizer"] + (" + whitening" if run.get("whiten") else "")


def markdown(rows: list[dict], settings: dict, plots: list[str]) -> str:
    s = settings
    out = [
        "# Codebook collapse: plain VQ vs SimVQ",
        "",
        f"One stage of K codes, the same `{s.get('size')}` encoder/decoder ({_model_text(s.get('model', {}))}), "
        f"{s.get('steps')} steps of {s.get('batch_size')} x {s.get('segment_samples')} samples, "
        f"lr {s.get('lr')}, mel + VQ losses only, seed {s.get('seed')}. Dev set: "
        f"{s.get('dev_frames', 'n/a')} frames of `{s.get('dev')}`; training data `{s.get('train')}`.",
        "",
        "utilisation = codes used at least once over the dev set / K; ceiling = the utilisation expected "
        "if every code were equally likely, 1 - (1 - 1/K)^frames (a finite dev set cannot show more); "
        "perplexity = exp of the entropy of the dev code histogram (K at best); "
        "ranks = exp of the entropy of the normalised singular values of the centred encoder outputs "
        "(latent, at most D) and of the K codes (codebook); mel = log-mel L1 of reconstructed dev clips. "
        "Figures are from the last step; peak = best utilisation seen after step 0.",
    ]
    head = [
        "quantizer",
        "K",
        "used",
        "utilisation",
        "ceiling",
        "peak",
        "perplexity",
        "ppl / K",
        "latent rank",
        "codebook rank",
        "mel",
        "train s",
    ]

    def table(selected: list[dict], first: list[str], cells) -> list[str]:
        lines = ["", "| " + " | ".join(first + head[1:]) + " |", "|" + "---|" * (len(first) + len(head) - 1)]
        for r in selected:
            lines.append(
                "| "
                + " | ".join(
                    cells(r)
                    + [
                        str(r["codebook_size"]),
                        f"{r['used']}",
                        f"{100 * r['utilisation']:.1f}%",
                        f"{100 * r['ceiling']:.0f}%",
                        f"{100 * r['peak_utilisation']:.1f}%",
                        _fmt(r["perplexity"], 1),
                        _fmt(r["perplexity_per_k"], 3),
                        _fmt(r["latent_rank"], 1),
                        _fmt(r["codebook_rank"], 1),
                        _fmt(r["mel"], 3),
                        _fmt(r["train_seconds"], 0),
                    ]
                )
                + " |"
            )
        return lines

    main = sorted((r for r in rows if _is_main(r)), key=lambda r: (r["codebook_size"], r["whiten"], r["quantizer"]))
    if main:
        out += [
            "",
            "## Quantizer, whitening and codebook size (init scale 1, data-dependent init)",
            "",
            "whitening = the stage's lookup input whitened with running statistics (the shipped model's setting); "
            "without it, the paper's setting.",
        ]
        out += table(main, ["quantizer"], lambda r: [_label(r)])
    init_k, init_whiten = _init_study(rows)
    if init_k is not None:
        init = sorted(
            (r for r in rows if r["codebook_size"] == init_k and r["whiten"] == init_whiten),
            key=lambda r: (r["quantizer"], not r["init_from_data"], r["init_scale"]),
        )
        out += [
            "",
            f"## Initial codebook scale (K = {init_k}, {'with' if init_whiten else 'no'} whitening)",
            "",
            "scale multiplies the random initial codebook (SimVQ: the frozen C; VQ: the codes). With data init "
            "the model rescales the codes to the encoder output's spread on the first batch, relative to that "
            "scale; without it, codes start with std scale x D^-1/2 per dimension.",
        ]
        out += table(
            init,
            ["quantizer", "scale", "data init"],
            lambda r: [r["quantizer"], f"{r['init_scale']:g}", "yes" if r["init_from_data"] else "no"],
        )
    if plots:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def _model_text(model: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in model.items()) or "SimVQCodec defaults"


def _init_study(rows: list[dict]) -> tuple[int | None, bool]:
    """K and whitening of the init-scale study (the runs that are not scale 1 with data init), or (None, False)."""
    other = [r for r in rows if not _is_main(r)]
    return (other[0]["codebook_size"], other[0]["whiten"]) if other else (None, False)


def plot_curves(summaries: list[dict], path: Path) -> None:
    """Utilisation, perplexity / K and latent effective rank against step: one column per K, both quantizers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [s for s in summaries if s["init_scale"] == 1.0 and s["init_from_data"]] or summaries
    ks = sorted({s["codebook_size"] for s in main})
    fig, axes = plt.subplots(3, len(ks), figsize=(4.2 * len(ks), 8.4), squeeze=False, sharex=True)
    colors = {"vq": "tab:red", "simvq": "tab:blue"}
    for col, k in enumerate(ks):
        for s in (s for s in main if s["codebook_size"] == k):
            steps = [r["step"] for r in s["curve"]]
            style = dict(
                marker="o",
                markersize=3,
                color=colors.get(s["quantizer"]),
                label=_label(s),
                linestyle="--" if s.get("whiten") else "-",
            )
            axes[0, col].plot(steps, [100 * r["utilisation"] for r in s["curve"]], **style)
            axes[1, col].plot(steps, [r["perplexity"] / k for r in s["curve"]], **style)
            axes[2, col].plot(steps, [r["latent_rank"] for r in s["curve"]], **style)
        frames = max((r["frames"] for s in main for r in s["curve"]), default=0)
        ceiling = uniform_coverage(frames, k)
        if frames and ceiling < 0.99:
            axes[0, col].axhline(100 * ceiling, color="gray", linestyle=":", label="ceiling (uniform use)")
        axes[0, col].set_title(f"K = {k}")
        axes[0, col].set_yscale("log")  # from one code (100 / K %) to all of them
        axes[0, col].set_ylim(50 / k, 150)
        axes[1, col].set_yscale("log")
        axes[2, col].set_xlabel("step")
        for ax in axes[:, col]:
            ax.grid(True, alpha=0.3)
        axes[0, col].legend(fontsize=8)
    axes[0, 0].set_ylabel("dev utilisation %")
    axes[1, 0].set_ylabel("dev perplexity / K")
    axes[2, 0].set_ylabel("latent effective rank")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_init(rows: list[dict], k: int, whiten: bool, path: Path) -> None:
    """Final utilisation against initial codebook scale at K = k, a line per quantizer x data init."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for q, color in (("vq", "tab:red"), ("simvq", "tab:blue")):
        for data_init, style in ((True, "-"), (False, "--")):
            pts = sorted(
                (r["init_scale"], 100 * r["utilisation"])
                for r in rows
                if r["codebook_size"] == k
                and r["whiten"] == whiten
                and r["quantizer"] == q
                and r["init_from_data"] == data_init
            )
            if pts:
                ax.plot(
                    *zip(*pts),
                    style,
                    marker="o",
                    color=color,
                    label=f"{q}, {'data init' if data_init else 'no data init'}",
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(50 / k, 150)
    ax.set_xlabel("initial codebook scale")
    ax.set_ylabel("final dev utilisation %")
    ax.set_title(f"Codebook initial scale, K = {k}" + (", whitened" if whiten else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, summaries: list[dict], settings: dict, plots: bool = True) -> list[Path]:
    """Write collapse.json (settings, table, full curves), collapse.csv (the table), collapse.md and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [final_row(s) for s in summaries]
    written = []
    names = []
    if plots and summaries:
        plot_curves(summaries, out / CURVES_PLOT)
        names.append(CURVES_PLOT)
        k, whiten = _init_study(rows)
        if k is not None:
            plot_init(rows, k, whiten, out / INIT_PLOT)
            names.append(INIT_PLOT)
    data = {"settings": settings, "table": rows, "runs": summaries}
    text = json.dumps(strict_json(data), indent=1, allow_nan=False) + "\n"
    (out / "collapse.json").write_text(text, encoding="utf-8")
    with open(out / "collapse.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    (out / "collapse.md").write_text(markdown(rows, settings, names), encoding="utf-8")
    written += [out / "collapse.md", out / "collapse.csv", out / "collapse.json", *(out / n for n in names)]
    return written
