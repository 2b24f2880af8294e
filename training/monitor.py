"""What a run reports (rank 0 only): progress bar or plain lines, TensorBoard, and JSON lines files."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from training.dev import DevResult, mel_figure
from training.losses import MultiScaleMelLoss
from training.phases import PhaseSpan

TRAIN_LOG = "train_metrics.jsonl"
DEV_LOG = "dev_metrics.jsonl"
BAR_KEYS = ("mel", "stft/complex", "adv/gen", "adv/disc")


class Monitor:
    """Reports training scalars every `log_every` steps and dev passes.

    Scalars go to TensorBoard (`RUN_DIR/tb`) and to `RUN_DIR/train_metrics.jsonl`; dev results (of the
    out-of-domain dev set too, where the run has one) to TensorBoard and `RUN_DIR/dev_metrics.jsonl`; each
    record names the phase of the run it comes from. TensorBoard (and its mel images, which need matplotlib)
    is skipped where it is not installed. A tqdm bar shows steps/s and the main losses on a terminal;
    otherwise a plain line is printed every `log_every` steps. On resume, records after `start_step` (written
    by the interrupted run after its last checkpoint) are dropped so each step appears once.

    Args:
        run_dir: the run directory.
        total_steps: steps of the whole run.
        start_step: steps already done (0, or the checkpoint's step).
        log_every: steps between records.
        sample_rate: Hz, for audio samples.
    """

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, log_every: int, sample_rate: int):
        self.run_dir = run_dir
        self.log_every = log_every
        self.sample_rate = sample_rate
        self.tty = sys.stderr.isatty()
        for name in (TRAIN_LOG, DEV_LOG):
            _drop_after(run_dir / name, start_step)
        self.writer = _summary_writer(run_dir / "tb", start_step)
        self.figures = not isinstance(self.writer, _NoWriter) and importlib.util.find_spec("matplotlib") is not None
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", disable=not self.tty, dynamic_ncols=True)
        self.last = (start_step, time.perf_counter())
        self.references_logged = False

    def phase(self, span: PhaseSpan, phases: int, step: int) -> None:
        """Say that the run trains phase `span` (of `phases`) from `step` on."""
        line = (
            f"phase {span.name} ({span.index + 1} of {phases}): steps {step}-{span.end} of {self.bar.total}"
            f"{', adversarial' if span.adversarial else ''}"
        )
        (self.bar.write if self.tty else lambda s: print(s, file=sys.stderr))(line)

    def step(self, step: int, scalars: dict[str, float], phase: str) -> None:
        """Record the scalars of `step` (1-based count of finished steps, in `phase`) when it is a logging step."""
        self.bar.update(1)
        if step % self.log_every:
            return
        last_step, last_time = self.last
        now = time.perf_counter()
        scalars = {**scalars, "perf/steps_per_s": (step - last_step) / max(now - last_time, 1e-9)}
        self.last = (step, now)
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        _append(self.run_dir / TRAIN_LOG, {"step": step, "phase": phase, "time": time.time(), **scalars})
        shown = {k: f"{scalars[k]:.3f}" for k in BAR_KEYS if k in scalars}
        if self.tty:
            self.bar.set_postfix({"phase": phase, **shown}, refresh=False)
        else:
            text = " ".join(f"{k}={v}" for k, v in shown.items())
            print(
                f"step {step}/{self.bar.total} ({phase}) {scalars['perf/steps_per_s']:.2f} steps/s {text}",
                file=sys.stderr,
            )

    def dev(
        self,
        step: int,
        result: DevResult,
        clips: list[torch.Tensor],
        mel_loss: MultiScaleMelLoss,
        phase: str,
        ood: DevResult | None = None,
    ) -> None:
        """Record a dev pass at the end of `step` (in `phase`): scalars per stage, the JSON line, audio and mel
        images of the first clips. `ood`, the pass over the out-of-domain dev set where the run has one, goes
        under `dev-ood/` and into the JSON line's `ood`."""
        w = self.writer
        self._dev_scalars("dev", result, step)
        for i, audio in enumerate(result.outputs):
            if not self.references_logged:
                w.add_audio(f"dev/reference_{i}", clips[i][0].clamp(-1, 1), 0, self.sample_rate)
            w.add_audio(f"dev/decoded_{i}", audio[0].clamp(-1, 1), step, self.sample_rate)
            if self.figures:
                w.add_figure(f"dev/mel_{i}", mel_figure(clips[i], audio, mel_loss), step)
        self.references_logged = True
        record = {"step": step, **result.to_json(), "phase": phase}
        line = (
            f"dev step {step} ({phase}): {_mel_text(result)}, "
            f"convergence {result.convergence:.3f}, utilisation " + " ".join(f"{u:.2f}" for u in result.utilisation)
        )
        if result.voicing_accuracy is not None:
            line += f", voicing {result.voicing_accuracy:.2f}, f0 error {result.f0_error_cents:.0f} cents"
        if ood is not None:
            self._dev_scalars("dev-ood", ood, step)
            record["ood"] = ood.to_json()
            line += f", ood {_mel_text(ood)}"
        w.flush()
        _append(self.run_dir / DEV_LOG, record)
        (self.bar.write if self.tty else lambda s: print(s, file=sys.stderr))(line)

    def _dev_scalars(self, prefix: str, result: DevResult, step: int) -> None:
        """The scalars of one dev set's pass, under `prefix/` (`dev/mel`, `dev-ood/utilisation/stage_00`)."""
        w = self.writer
        w.add_scalar(f"{prefix}/mel", result.mel, step)
        w.add_scalar(f"{prefix}/mel_unquantized", result.mel_unquantized, step)
        for k, mel in result.mel_at_stages.items():
            w.add_scalar(f"{prefix}/mel_{k}_stages", mel, step)
        w.add_scalar(f"{prefix}/convergence", result.convergence, step)
        for i, (used, ppl) in enumerate(zip(result.utilisation, result.perplexity)):
            w.add_scalar(f"{prefix}/utilisation/stage_{i:02d}", used, step)
            w.add_scalar(f"{prefix}/perplexity/stage_{i:02d}", ppl, step)
        w.add_scalar(f"{prefix}/utilisation/mean", result.utilisation_mean, step)

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


def _mel_text(result: DevResult) -> str:
    fewer = "".join(f"{k} stages {mel:.3f}, " for k, mel in result.mel_at_stages.items())
    return f"mel {result.mel:.3f} ({fewer}unquantized {result.mel_unquantized:.3f})"


def _summary_writer(folder: Path, start_step: int):
    """A TensorBoard writer, or one that drops everything where tensorboard is not installed (training.bundle_run
    on a bare GPU machine)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return _NoWriter()
    return SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)


class _NoWriter:
    """Takes `SummaryWriter` calls and does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def read_jsonl(path: Path) -> list[dict]:
    """All complete records of a JSON lines log (a line torn by a killed process is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _drop_after(path: Path, step: int) -> None:
    records = read_jsonl(path)
    kept = [r for r in records if r["step"] <= step]
    if len(kept) != len(records):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(path)
