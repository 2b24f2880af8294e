"""Runs in subprocesses: `kill -9` in the middle of training, then resume; torchrun with two gloo processes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests import test_train_loop
from tests.test_train_loop import TINY, losses, tiny_config
from training import checkpoints
from training.monitor import TRAIN_LOG, read_jsonl
from training.train import Trainer

ROOT = Path(__file__).parent.parent
corpus = test_train_loop.corpus  # the fixture, shared with test_train_loop


def _train_command(corpus: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "training",
        "train",
        "--config",
        str(TINY),
        "--run-dir",
        str(run_dir),
        f"data.train={corpus}",
        "data.dev=null",
        "data.dev_fraction=0.34",
        *overrides,
    ]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_kill_9_mid_run_then_resume_matches_an_uninterrupted_run(corpus, tmp_path):
    overrides = ("steps=8", "ckpt_every=2", "eval_every=0")
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_command(corpus, run, *overrides),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "latest").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.05)  # into the next step
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    at_kill = checkpoints.latest_checkpoint(run / "checkpoints")
    assert at_kill is not None and at_kill.name != "step_00000008.pt"

    done = subprocess.run(
        _train_command(corpus, run, *overrides), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]

    reference = tmp_path / "reference"
    Trainer(tiny_config(corpus, *overrides), reference).fit()
    assert losses(run) == losses(reference)  # every step once, each equal to the uninterrupted run's
    assert sorted(losses(run)) == list(range(1, 9))
    a = checkpoints.load_checkpoint(run / "checkpoints" / "step_00000008.pt")
    b = checkpoints.load_checkpoint(reference / "checkpoints" / "step_00000008.pt")
    assert all(torch.equal(a["ema"]["model"][k], v) for k, v in b["ema"]["model"].items())


def test_torchrun_two_gloo_processes_write_a_checkpoint(corpus, tmp_path):
    run = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        *_train_command(corpus, run, "steps=3", "ckpt_every=3", "eval_every=3")[1:],
    ]
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = checkpoints.load_checkpoint(run / "checkpoints" / "step_00000003.pt")
    assert state["step"] == 3 and state["world_size"] == 2
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert state["data_position"] == [0, 3]  # 3 global batches of 2 x 2 crops
    assert [r["step"] for r in read_jsonl(run / TRAIN_LOG)] == [1, 2, 3]  # rank 0 logs alone
    assert (run / "dev_metrics.jsonl").is_file()
