"""`simvq-codec eval-compare`: is a candidate model better than a baseline, file by file?

Two evaluations of the same files (`simvq-codec eval ... --out DIR`) are compared per codec setting by the
per-file paired difference (candidate - baseline): its mean, its standard error, and a verdict. A setting
is "better" or "worse" only when the mean difference is beyond twice its standard error, the margin the
model card's export rule uses; neighbouring checkpoints of one training run move by about that much.
`--by kind` repeats the comparison within each kind of speech (the manifest's `kind` column).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from codec.errors import CodecError
from eval.cli import EXIT_USAGE, comma_list
from eval.metrics import METRICS
from eval.report import NO_KIND
from eval.run import MEAN, group_by_kind

LOWER_IS_BETTER = {"mel_distance"}
MARGIN = 2.0
"""A difference counts when it is beyond MARGIN standard errors of the paired mean."""

EPILOG = """examples:
  simvq-codec eval dev.csv --per-speaker 25 --model simvq-16k --out runs/eval-base --no-peers
  simvq-codec eval dev.csv --per-speaker 25 --model runs/export --out runs/eval-cand --no-peers
  simvq-codec eval-compare runs/eval-base runs/eval-cand
  simvq-codec eval-compare runs/eval-base runs/eval-cand --metrics pesq_wb,stoi,mel_distance
  simvq-codec eval-compare runs/eval-base runs/eval-cand --by kind     # read, acted, telephone apart
"""


@dataclass(frozen=True)
class Comparison:
    """One codec setting and metric (and kind of speech, with `--by kind`): means over the files both evaluations
    scored, and their paired difference."""

    codec: str
    setting: str
    metric: str
    files: int
    baseline: float
    candidate: float
    diff: float
    stderr: float
    kind: str | None = None

    @property
    def verdict(self) -> str:
        gain = -self.diff if self.metric in LOWER_IS_BETTER else self.diff
        if self.files < 2 or abs(gain) <= MARGIN * self.stderr:
            return "level"
        return "better" if gain > 0 else "worse"


def read_results(path: Path) -> dict[tuple[str, str], dict[str, dict]]:
    """results.csv (or the eval folder holding it) -> {(codec, setting): {file: row}}, MEAN rows left out."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.csv"
    if not path.is_file():
        raise CodecError(f"{path}: not found (pass an eval --out folder or its results.csv)")
    table: dict[tuple[str, str], dict[str, dict]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"file", "codec", "setting"} - set(reader.fieldnames or ())
        if missing:
            raise CodecError(f"{path}: not an eval results.csv (no {', '.join(sorted(missing))} column)")
        for row in reader:
            if row["file"] != MEAN:
                table.setdefault((row["codec"], row["setting"]), {})[row["file"]] = row
    return table


def _value(row: dict, metric: str) -> float:
    text = row.get(metric, "")
    return float(text) if text not in ("", None) else math.nan


def compare(baseline: dict, candidate: dict, metrics: list[str], by_kind: bool = False) -> list[Comparison]:
    """Paired comparisons for every (codec, setting) both tables hold, in the baseline's order; with ``by_kind``,
    one per kind of speech of the baseline's files.

    Only files where both sides have a finite score count (a metric can be undefined on a file)."""
    out = []
    for key, base_rows in baseline.items():
        cand_rows = candidate.get(key)
        if cand_rows is None:
            continue
        files = [f for f in base_rows if f in cand_rows]
        groups = {None: files}
        if by_kind:
            kinds = {f: base_rows[f].get("kind") or None for f in files}
            groups = {k or NO_KIND: g for k, g in group_by_kind(files, kinds.get).items()}
        for kind, group in groups.items():
            for metric in metrics:
                pairs = [(_value(base_rows[f], metric), _value(cand_rows[f], metric)) for f in group]
                pairs = [(b, c) for b, c in pairs if math.isfinite(b) and math.isfinite(c)]
                if not pairs:
                    continue
                n = len(pairs)
                diffs = [c - b for b, c in pairs]
                stderr = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
                out.append(
                    Comparison(
                        *key,
                        metric,
                        n,
                        statistics.fmean(b for b, _ in pairs),
                        statistics.fmean(c for _, c in pairs),
                        statistics.fmean(diffs),
                        stderr,
                        kind,
                    )
                )
    return out


def markdown(comparisons: list[Comparison]) -> str:
    """The comparison table, with a kind column when the comparisons are by kind."""
    by_kind = any(c.kind is not None for c in comparisons)
    head = ["codec", "setting", *(["kind"] if by_kind else []), "metric", "files", "baseline", "candidate"]
    head += ["difference", "std. error", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for c in comparisons:
        kind = f" {c.kind} |" if by_kind else ""
        lines.append(
            f"| {c.codec} | {c.setting} |{kind} {c.metric} | {c.files} | {c.baseline:.3f} | {c.candidate:.3f} "
            f"| {c.diff:+.3f} | {c.stderr:.3f} | {c.verdict} |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("baseline", type=Path, help="eval --out folder (or its results.csv) of the model to beat")
    p.add_argument("candidate", type=Path, help="eval --out folder (or results.csv) of the candidate, same files")
    p.add_argument(
        "--metrics",
        type=comma_list(str),
        default=["pesq_wb", "stoi"],
        metavar="LIST",
        help=f"metrics to compare (default pesq_wb,stoi; any of {','.join(METRICS)})",
    )
    p.add_argument(
        "--by",
        choices=["kind"],
        help="compare within each kind of speech (results of a manifest with a kind column)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        unknown = sorted(set(args.metrics) - set(METRICS))
        if unknown:
            raise CodecError(f"unknown metric {', '.join(unknown)}: choose from {', '.join(METRICS)}")
        baseline, candidate = read_results(args.baseline), read_results(args.candidate)
        by_kind = args.by == "kind"
        if by_kind and not any(row.get("kind") for rows in baseline.values() for row in rows.values()):
            raise CodecError(
                f"{args.baseline}: no file has a kind: --by kind needs an eval of a manifest with a kind column"
            )
        comparisons = compare(baseline, candidate, args.metrics, by_kind)
        if not comparisons:
            raise CodecError(
                f"no codec setting scored on the same files in both: {sorted(baseline)} and {sorted(candidate)}"
            )
    except CodecError as exc:
        print(f"simvq-codec eval-compare: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(markdown(comparisons), end="")
    return 0


def register(subparsers) -> None:
    """Add the `eval-compare` subcommand (entry point `simvq_codec.commands`)."""
    p = subparsers.add_parser(
        "eval-compare",
        help="paired per-file comparison of two evaluations of one file set",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)
