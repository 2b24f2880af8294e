"""The codebook collapse experiment: plain VQ against SimVQ, codebook sizes, and codebook initial scale.

Every run trains the same single-stage codec (mel + VQ losses, no adversary) with `training.train.Trainer`
on the same data and budget; only the quantizer, K, the whitening of the lookup space, the initial codebook
scale and `init_from_data` change.
At fixed steps the live weights are measured on a fixed dev set (`eval.collapse_metrics`): utilisation,
perplexity, effective rank of the encoder outputs and of the codes, reconstruction mel distance.
Runs resume from their checkpoints when the command is repeated with the same --out.
See docs/collapse.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from codec.errors import CodecError
from eval.cli import comma_list

SNAPSHOT = Path("data/corpus-snapshot")  # a frozen copy of the corpus (`make corpus` builds data/corpus)
RUNS = "runs"
CURVE_LOG = "collapse_metrics.jsonl"
SUMMARY = "summary.json"
EXPERIMENT = "experiment.json"
MACHINE_KEYS = ("threads", "device", "data.num_workers", "data.cache", "precision")
"""Overrides that may change between a run and its resumption (they do not change what is trained)."""
CONTROLLED = (
    "model.quantizer",
    "model.codebook_size",
    "model.n_stages",
    "model.init_from_data",
    "model.whiten_codes",
    "model.code_dim",
    "model.principal_maps",
    "steps",
)

LOOKUP = {"code_dim": 8, "principal_maps": False}
"""The study's single stage searches an 8-dim lookup through learned maps, whatever the model's defaults."""

SIZES = {
    # For tests: a second per step is already generous.
    "tiny": dict(encoder_dim=32, encoder_layers=2, decoder_dim=32, decoder_layers=2, latent_dim=16),
    # The CPU default: small enough for minutes per run on one thread.
    "small": dict(encoder_dim=64, encoder_layers=2, decoder_dim=64, decoder_layers=3, latent_dim=32),
    # The shipped codec's encoder and decoder sizes (SimVQCodec defaults): for a GPU.
    "base": {},
}
STUDY_MODEL = dict(
    phase="absolute",
    straight_through="stage",
    quantize_fraction=1.0,
    pitch_prior=False,
    rephase_iters=0,
    advance_features=False,
)
"""What every size has around its quantizer: the plain decoder (no pitch head, no re-phasing), and every example
decoded from its codes, as in the study's first runs."""

EPILOG = """examples:
  python -m eval.collapse --out runs/collapse                                   # the full study (CPU, hours)
  python -m eval.collapse --out runs/collapse-quick --ks 1024 --steps 20 --evals 2 --dev-minutes 1 --no-init-study
  python -m eval.collapse --out runs/collapse-gpu --size base --steps 20000 --batch-size 32 \\
      --segment-seconds 1 --threads 0 device=cuda data.num_workers=4
"""


class Interrupted(CodecError):
    """A run stopped before its planned step (SIGTERM or max_minutes); repeating the command resumes it."""


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study.

    Args:
        quantizer: "vq" or "simvq".
        codebook_size: K of the single stage.
        init_scale: factor applied to the codebook's random initial values (SimVQ: the frozen C; VQ: the
            learned codes) before training; `init_from_data` rescales relative to it, so it persists.
        init_from_data: the model's data-dependent rescaling of the codes on the first batch.
        whiten: whiten the stage's lookup input with running statistics (the shipped model's fix for the
            encoder's nearly one-dimensional output, docs/architecture.md); off is the paper's setting.
    """

    quantizer: str
    codebook_size: int
    init_scale: float = 1.0
    init_from_data: bool = True
    whiten: bool = False

    @property
    def name(self) -> str:
        init = "datainit" if self.init_from_data else "noinit"
        whiten = "-whiten" if self.whiten else ""
        return f"{self.quantizer}-K{self.codebook_size}-x{self.init_scale:g}-{init}{whiten}"

    def overrides(self) -> list[str]:
        return _overrides(
            {
                "model.n_stages": 1,
                "model.quantizer_dropout": 0.0,
                "model.quantizer": self.quantizer,
                "model.codebook_size": self.codebook_size,
                "model.init_from_data": self.init_from_data,
                "model.whiten_codes": self.whiten,
                **{f"model.{key}": value for key, value in LOOKUP.items()},
            }
        )


@dataclass
class Experiment:
    """The plan shared by every run.

    Args:
        out: output folder (runs/<name>/ holds each run's checkpoints and logs).
        overrides: training config overrides common to every run (`key=value`).
        eval_steps: steps at which the dev set is measured (0 = before the first update).
        keep_checkpoints: keep a finished run's checkpoints (otherwise deleted, the logs stay).
        settings: what the report shows about the set-up.
    """

    out: Path
    overrides: list[str]
    eval_steps: list[int]
    keep_checkpoints: bool = False
    settings: dict = field(default_factory=dict)


def plan(ks, quantizers, init_scales, init_k: int | None, init_modes=(True, False), whitens=(False,)) -> list[RunSpec]:
    """The main study (every K x whitening x quantizer, scale 1, data init), then the init-scale study at K = init_k
    with the first of `whitens`."""
    specs = [RunSpec(q, k, whiten=w) for k in ks for w in whitens for q in quantizers]
    if init_k:
        specs += [RunSpec(q, init_k, s, d, whitens[0]) for q in quantizers for d in init_modes for s in init_scales]
    seen, unique = set(), []
    for spec in specs:
        if spec not in seen:
            seen.add(spec)
            unique.append(spec)
    return unique


def eval_schedule(steps: int, evals: int) -> list[int]:
    """Step 0 and `evals` evenly spaced steps up to `steps`."""
    return sorted({0, *(round(steps * i / evals) for i in range(1, evals + 1))})


def scale_codebook(model, factor: float) -> None:
    """Multiply every stage's random initial codebook by `factor` (in place, before any training step)."""
    with torch.no_grad():
        for stage in model.quantizer.stages:
            (stage.frozen_codebook if stage.kind == "simvq" else stage.codes).mul_(factor)


def run_one(spec: RunSpec, exp: Experiment, dev, shared_cache: dict | None = None, log=print) -> dict:
    """Train (or resume, or just read back) one run and return its summary (`SUMMARY` in its folder)."""
    from eval.collapse_metrics import measure
    from training.config import load_config
    from training.monitor import read_jsonl
    from training.train import Trainer

    run_dir = exp.out / RUNS / spec.name
    if (run_dir / SUMMARY).is_file():
        return json.loads((run_dir / SUMMARY).read_text())
    cfg = load_config(None, [*exp.overrides, *spec.overrides()])
    trainer = Trainer(cfg, run_dir)
    if trainer.resumed_from is None:
        scale_codebook(trainer.model, spec.init_scale)
        scale_codebook(trainer.ema.model, spec.init_scale)
    if shared_cache is not None and cfg.data.cache and cfg.data.num_workers == 0:
        trainer.dataset.cache = shared_cache  # the same files for every run: decode them once
    curve_path = run_dir / CURVE_LOG
    curve = [r for r in read_jsonl(curve_path) if r["step"] <= trainer.step]
    run_dir.mkdir(parents=True, exist_ok=True)
    curve_path.write_text("".join(json.dumps(r) + "\n" for r in curve), encoding="utf-8")
    done = {r["step"] for r in curve}
    for target in exp.eval_steps:
        if target in done or target < trainer.step:
            continue
        if target > trainer.step:
            trainer.fit(until=target)
            if trainer.step < target:
                raise Interrupted(f"{spec.name} stopped at step {trainer.step}; run the same command to resume")
        started = time.monotonic()
        m = measure(trainer.model, dev, trainer.mel_loss)
        record = {
            "step": target,
            **m.to_json(),
            "train_seconds": round(trainer.elapsed, 2),
            "measure_seconds": round(time.monotonic() - started, 2),
        }
        with open(curve_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        curve.append(record)
        log(
            f"{spec.name} step {target}: utilisation {m.utilisation:.3f} ({m.used}/{spec.codebook_size}), "
            f"perplexity {m.perplexity:.1f}, latent rank {m.latent_rank:.1f}, mel {m.mel:.3f}"
        )
    summary = {
        **asdict(spec),
        "name": spec.name,
        "steps": trainer.step,
        "train_seconds": round(trainer.elapsed, 2),
        "curve": curve,
    }
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    if not exp.keep_checkpoints:
        shutil.rmtree(trainer.ckpt_dir, ignore_errors=True)
    return summary


def run_experiment(specs: list[RunSpec], exp: Experiment, dev, log=print) -> list[Path]:
    """Every run in order; the tables are rewritten after each run (a partial study is readable), plots at the end."""
    from eval.collapse_report import write_report

    summaries, cache = [], {}
    for i, spec in enumerate(specs):
        log(f"[{i + 1}/{len(specs)}] {spec.name}")
        summaries.append(run_one(spec, exp, dev, cache, log))
        if i + 1 < len(specs):
            write_report(exp.out, summaries, exp.settings, plots=False)
    return write_report(exp.out, summaries, exp.settings)


def _overrides(values: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def base_overrides(args) -> list[str]:
    """Training config shared by every run: the data, the budget, mel + VQ losses only, no adversary."""
    sample_rate = 16000
    segment = max(1, round(args.segment_seconds * sample_rate / 320)) * 320
    values = {
        "model": {**SIZES[args.size], **STUDY_MODEL},
        "data.train": str(args.train),
        "data.dev": str(args.dev),
        "data.segment_samples": segment,
        "data.batch_size": args.batch_size,
        "data.num_workers": 0,
        "steps": args.steps,
        "optim.lr": args.lr,
        "optim.warmup_steps": max(1, args.steps // 10),
        "loss.weights": {
            "stft/complex": 0.0,
            "stft/linear": 0.0,
            "spec/mag": 0.0,
            "spec/phase": 0.0,
            "vq/residual": 0.0,
            "adv/gen": 0.0,
            "adv/feat": 0.0,
        },
        "disc.periods": [2],
        "disc.mpd_channels": [4],
        "disc.resolutions": [],  # built by the trainer, never used
        "adv": False,
        "eval_every": 0,
        "ckpt_every": args.steps,
        "keep_last": 1,
        "log_every": max(1, args.steps // 10),
        "seed": args.seed,
        "threads": args.threads,
        "device": args.device,
    }
    return _overrides(values)


def _switches(values: list[str], option: str, words: tuple[str, str]) -> list[bool]:
    """["off", "on"] -> [False, True] (words = the false and the true spelling)."""
    bad = [v for v in values if v not in words]
    if bad or not values:
        raise CodecError(f"{option} takes {words[0]} and/or {words[1]}, got {','.join(values) or 'nothing'}")
    return [v == words[1] for v in values]


def _check_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in CONTROLLED:
            raise CodecError(f"{key} is set by the experiment for each run; use the options (--ks, --steps, ...)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (a rerun resumes it)")
    study = p.add_argument_group("study")
    study.add_argument(
        "--ks",
        type=comma_list(int),
        default=[1024, 8192, 65536],
        metavar="LIST",
        help="codebook sizes of the main study (default 1024,8192,65536)",
    )
    study.add_argument(
        "--quantizers", type=comma_list(str), default=["vq", "simvq"], metavar="LIST", help="vq,simvq (default both)"
    )
    study.add_argument(
        "--whitening",
        type=comma_list(str),
        default=["off", "on"],
        metavar="LIST",
        help="lookup-space whitening of the main study: off (the paper's setting), on (the shipped "
        "model's), or both (default off,on); the init study uses the first",
    )
    study.add_argument(
        "--init-scales",
        type=comma_list(float),
        default=[0.1, 1.0, 10.0],
        metavar="LIST",
        help="initial codebook scale factors of the init study (default 0.1,1,10)",
    )
    study.add_argument("--init-k", type=int, default=1024, metavar="K", help="K of the init study (default 1024)")
    study.add_argument(
        "--init-data",
        type=comma_list(str),
        default=["yes", "no"],
        metavar="LIST",
        help="data-dependent code init in the init study: yes, no or both (default yes,no)",
    )
    study.add_argument("--no-init-study", action="store_true", help="main study only")
    budget = p.add_argument_group("budget (the same for every run)")
    budget.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="small",
        help="encoder/decoder size: tiny, small (CPU default), base (the shipped codec's)",
    )
    budget.add_argument("--steps", type=int, default=1500, help="training steps per run (default 1500)")
    budget.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    budget.add_argument("--segment-seconds", type=float, default=0.5, help="training crop length (default 0.5)")
    budget.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    budget.add_argument("--evals", type=int, default=10, help="dev measurements after step 0 (default 10)")
    budget.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    budget.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    budget.add_argument("--seed", type=int, default=0)
    data = p.add_argument_group("data")
    data.add_argument("--train", type=Path, default=SNAPSHOT / "train.csv", help="training manifest or folder")
    data.add_argument("--dev", type=Path, default=SNAPSHOT / "dev.csv", help="dev manifest or folder")
    data.add_argument(
        "--dev-minutes",
        type=float,
        default=30.0,
        help="dev audio measured (default 30, 0 = all); with N frames utilisation cannot exceed "
        "1-(1-1/K)^N: 0.75 for K=65536 at 30 min, 0.96 with the whole 72 min dev set",
    )
    data.add_argument("--dev-clip-seconds", type=float, default=10.0, help="longest dev clip (default 10)")
    data.add_argument("--mel-clips", type=int, default=16, help="dev clips also scored for mel distance (default 16)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep finished runs' checkpoints")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="training config overrides for every run, e.g. model.encoder_dim=128 data.num_workers=2",
    )


def build(args) -> tuple[list[RunSpec], Experiment]:
    """Check the options and turn them into the run list and the shared plan."""
    if args.steps < 1 or args.evals < 1 or args.batch_size < 1:
        raise CodecError("--steps, --evals and --batch-size must be at least 1")
    if args.evals > args.steps:
        raise CodecError(f"--evals {args.evals} is more than --steps {args.steps}")
    bad = [q for q in args.quantizers if q not in ("vq", "simvq")]
    if bad:
        raise CodecError(f"unknown quantizer(s) {', '.join(bad)}: choose vq and/or simvq")
    for k in [*args.ks, args.init_k]:
        if k < 2 or k & (k - 1):
            raise CodecError(f"codebook sizes must be powers of two >= 2, got {k}")
    if any(s <= 0 for s in args.init_scales):
        raise CodecError("--init-scales must be positive")
    whitens = _switches(args.whitening, "--whitening", ("off", "on"))
    init_modes = _switches(args.init_data, "--init-data", ("no", "yes"))
    _check_overrides(args.overrides)
    specs = plan(
        args.ks, args.quantizers, args.init_scales, None if args.no_init_study else args.init_k, init_modes, whitens
    )
    overrides = [*base_overrides(args), *args.overrides]
    from training.config import load_config

    cfg = load_config(None, [*overrides, *specs[0].overrides()])  # fail now on a bad override, not after a run
    model = {k: v for k, v in cfg.model.items() if f"model.{k}" not in CONTROLLED and k != "quantizer_dropout"}
    settings = {
        "size": args.size,
        "model": model,
        "steps": args.steps,
        "batch_size": cfg.data.batch_size,
        "segment_samples": cfg.data.segment_samples,
        "lr": cfg.optim.lr,
        "loss_weights": cfg.loss.weights,
        "train": cfg.data.train,
        "dev": str(args.dev),
        "dev_minutes": args.dev_minutes,
        "dev_clip_seconds": args.dev_clip_seconds,
        "seed": cfg.seed,
        "overrides": list(args.overrides),
    }
    exp = Experiment(args.out, overrides, eval_schedule(args.steps, args.evals), args.keep_checkpoints, settings)
    return specs, exp


def _check_same_plan(exp: Experiment) -> None:
    """A rerun into the same folder must train the same way, or resumed and new runs would not compare."""
    path = exp.out / EXPERIMENT
    same = [o for o in exp.overrides if o.partition("=")[0] not in MACHINE_KEYS]
    record = {
        "overrides": same,
        "eval_steps": exp.eval_steps,
        "dev": {k: exp.settings[k] for k in ("dev", "dev_minutes", "dev_clip_seconds")},
    }
    if path.is_file():
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in record} != record:
            raise CodecError(f"{exp.out} holds a study with other settings ({path}); use a new --out")
    exp.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    """Run the study from parsed arguments; 2 on a user error, 1 when interrupted (rerun to resume)."""
    try:
        specs, exp = build(args)
        _check_same_plan(exp)
        from eval.collapse_metrics import load_dev_set
        from codec.model import SimVQCodec

        single = {"codebook_size": 2, "n_stages": 1, "whiten_codes": False, **LOOKUP}
        probe = SimVQCodec(**{**exp.settings["model"], **single})  # only its sample rate and hop are read
        dev = load_dev_set(
            args.dev, probe.sample_rate, probe.hop_length, args.dev_minutes, args.dev_clip_seconds, args.mel_clips
        )
        frames = dev.samples // probe.hop_length
        exp.settings["dev_frames"] = frames
        log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
        log(
            f"{len(specs)} runs x {args.steps} steps; dev set: {len(dev.clips)} clips, {frames} frames "
            f"({dev.samples / probe.sample_rate / 60:.1f} min)"
        )
        paths = run_experiment(specs, exp, dev, log)
    except Interrupted as exc:
        print(f"collapse: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("collapse: interrupted; run the same command to resume from the last measurement", file=sys.stderr)
        return 130
    except CodecError as exc:
        print(f"collapse: error: {exc}", file=sys.stderr)
        return 2
    print((exp.out / "collapse.md").read_text(), end="")
    print(f"\nwrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    """Add a `collapse` subcommand (for an entry point of `simvq_codec.commands`, if the lead wants one)."""
    p = subparsers.add_parser(
        "collapse",
        help="codebook collapse study: VQ vs SimVQ, K, whitening, init scale",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.collapse",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
