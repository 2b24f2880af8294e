"""Step-time benchmark: generator-only and adversarial steps of a config on generated audio.

    python -m training.bench --config training/configs/simvq-16k.yaml [key=value ...] [--steps 5]

Prints milliseconds per step without and with the adversary; their difference is the discriminators' cost
(their own update plus their passes in the generator update).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from training.config import load_config
from training.train import Trainer


def _write_corpus(root: Path, sample_rate: int) -> None:
    """Two speakers of harmonic, amplitude-modulated tones (speech-like enough to time a step)."""
    rng = np.random.default_rng(0)
    t = np.arange(4 * sample_rate) / sample_rate
    for speaker in range(2):
        (root / f"spk{speaker}").mkdir(parents=True)
        for i in range(2):
            f0 = 100 + 40 * speaker + 20 * np.sin(2 * np.pi * 0.5 * t + i)
            phase = 2 * np.pi * np.cumsum(f0) / sample_rate
            audio = sum(np.sin(k * phase) / k for k in range(1, 15)) * (1 + np.sin(2 * np.pi * 3 * t)) ** 2
            audio = 0.05 * audio + 0.005 * rng.standard_normal(len(t))
            sf.write(root / f"spk{speaker}/u{i}.wav", audio.astype(np.float32), sample_rate)


def _time_steps(trainer: Trainer, batch: torch.Tensor, steps: int, adversarial: bool) -> tuple[float, float]:
    """Median wall and process CPU seconds per step (the first step, a warm-up, is not counted)."""
    wall, cpu = [], []
    for _ in range(steps + 1):
        trainer.step, trainer.phase_cfg.adv = 0, adversarial
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.train_step(batch)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall[1:]), statistics.median(cpu[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind (default 5)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_intermixed_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = load_config(args.config, [*args.overrides, "eval_every=0", "init_from="])  # timing needs no weights
        _write_corpus(root / "data", 16000)
        cfg.data.train, cfg.data.dev, cfg.data.dev_ood, cfg.data.dev_fraction = str(root / "data"), None, None, 0.5
        trainer = Trainer(cfg, root / "run")
        batch = torch.stack([trainer.dataset.crop((0, 0, i % 2, i)) for i in range(cfg.data.batch_size)])
        (g, g_cpu), (a, a_cpu) = (_time_steps(trainer, batch, args.steps, adv) for adv in (False, True))
    params = sum(p.numel() for p in trainer.model.parameters()) / 1e6
    disc_params = sum(p.numel() for p in trainer.disc.parameters()) / 1e6
    seconds = cfg.data.segment_samples / trainer.model.sample_rate
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"device {trainer.device}, {torch.get_num_threads()} threads (load average {load}); "
        f"batch {cfg.data.batch_size} x {seconds:g} s"
    )
    print(f"generator {params:.2f} M parameters, discriminators {disc_params:.2f} M")
    print(f"step without adversary: {1000 * g:.0f} ms wall, {1000 * g_cpu:.0f} ms CPU (median of {args.steps})")
    print(f"adversarial step:       {1000 * a:.0f} ms wall, {1000 * a_cpu:.0f} ms CPU ({1 / a:.2f} steps/s)")
    print(
        f"discriminators' share of an adversarial step: {100 * (a - g) / a:.0f} % wall, "
        f"{100 * (a_cpu - g_cpu) / a_cpu:.0f} % CPU"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
