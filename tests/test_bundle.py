"""training.bundle, training.bundle_run and training.portable: pack, train on the CPU, kill, resume, export."""

import argparse
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from codec import api
from codec.errors import CheckpointError
from codec.presets import load_model
from tests.conftest import speechlike, write_ood_manifest, write_speaker_corpus
from training import checkpoints
from training.bundle import WHEELS, BundleError, pack, read_bundle
from training.bundle_run import DeviceCorpus, OUT_FILES, main as bundle_run, prepare
from training.bundle_args import add_bundle_run_arguments
from training.cli import main as cli_main
from training.config import DataConfig, load_config
from training.data import AudioItem, decode, load_items
from training.export import export
from training.monitor import DEV_LOG, TRAIN_LOG, read_jsonl
from training.portable import MAX_FILE_BYTES, load_portable, save_portable
from training.train import Trainer

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "training" / "configs" / "tiny.yaml"
UNTIL_TIME_IS_UP = ("steps=100000", "log_every=1000")  # overrides: train until --minutes ends, log little


def run_args(bundle: Path, minutes: float, out: Path, work: Path, *rest: str) -> list[str]:
    """The command line of a bundle run: `BUNDLE --minutes M --out OUT --work WORK REST...`."""
    return [str(bundle), "--minutes", str(minutes), "--out", str(out), "--work", str(work), *rest]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three speakers of generated speech-like audio at 16, 22.05 and 8 kHz, one file shorter than a crop."""
    return write_speaker_corpus(tmp_path_factory.mktemp("corpus"), short=(0, 2))


@pytest.fixture(scope="module")
def bundle(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    code = cli_main(
        [
            "bundle",
            str(corpus),
            str(out),
            "--config",
            str(TINY),
            "--min-hours",
            "0",
            "--jobs",
            "1",
            "data.dev=null",
            "data.dev_fraction=0.34",
        ]
    )
    assert code == 0
    return out


def test_bundle_holds_the_train_split_as_opus_with_its_manifest_config_and_dev_clips(corpus, bundle):
    info = read_bundle(bundle)
    assert info["train"]["files"] == info["train"]["corpus_files"] == 6  # one speaker of three is held out
    assert info["train"]["speakers"] == ["spk0", "spk1"] and info["dev"]["speakers"] == ["spk2"]
    assert info["dev"]["clips"] == 2 and info["opus_kbps"] == 24.0
    assert 18 < info["measured_kbps"] < 40  # 24 kbit/s of VBR plus the Ogg headers of 1.2 s files
    cfg = load_config(bundle / "config.yaml")
    assert (cfg.data.train, cfg.data.dev, cfg.model["n_stages"]) == ("train.csv", "dev.csv", 4)
    for item in load_items(bundle / "train.csv"):
        assert item.path.suffix == ".opus" and sf.info(str(item.path)).subtype == "OPUS"
        source = sorted(corpus.glob(f"{item.speaker}/*.wav"))
        lengths = {len(decode(p, 16000)) for p in source}
        assert len(decode(item.path, 16000)) in lengths  # libsndfile gives back exactly the samples encoded
        assert item.duration in {round(n / 16000, 4) for n in lengths}


def test_a_bundle_packs_the_out_of_domain_dev_clips_and_its_run_scores_them(corpus, bundle, tmp_path, capsys):
    ood = write_ood_manifest(tmp_path)
    cfg = load_config(TINY, ["data.dev=null", "data.dev_fraction=0.34", f"data.dev_ood={ood}"])
    packed = pack(corpus, tmp_path / "b", cfg, min_hours=0, jobs=1)
    assert (packed.dev_clips, packed.dev_ood_clips) == (2, 2)
    info = read_bundle(packed.path)
    assert info["dev-ood"] == {"clips": 2, "speakers": ["ood0", "ood1"]} and info["dev"]["speakers"] == ["spk2"]
    assert load_config(packed.path / "config.yaml").data.dev_ood == "dev-ood.csv"
    clips = load_items(packed.path / "dev-ood.csv")
    assert [c.path for c in clips] == [packed.path / "dev-ood" / f"{i:04d}.opus" for i in range(2)]
    assert all(len(decode(c.path, 16000)) == 8000 and c.duration == 0.5 for c in clips)  # data.dev_clip_samples

    out, work = tmp_path / "out", tmp_path / "work"
    assert bundle_run(run_args(packed.path, 1, out, work, "steps=1")) == 0
    [record] = read_jsonl(work / DEV_LOG)
    assert record["ood"]["mel"] > 0 and record["ood"]["mel"] != record["mel"]
    assert f"ood mel {record['ood']['mel']:.3f}" in capsys.readouterr().err
    # Without data.dev_ood a bundle has none, as before.
    assert "dev-ood" not in read_bundle(bundle) and not (bundle / "dev-ood").exists()
    assert load_config(bundle / "config.yaml").data.dev_ood is None


def test_nothing_sensible_fits_is_refused_and_a_cut_keeps_every_speaker(corpus, tmp_path):
    cfg = load_config(TINY, ["data.dev=null", "data.dev_fraction=0.34"])
    with pytest.raises(BundleError, match="nothing sensible fits"):
        pack(corpus, tmp_path / "none", cfg, max_bytes=8 * 2**10, min_hours=0.0001)
    assert not (tmp_path / "none").exists()
    small = pack(corpus, tmp_path / "small", cfg, max_bytes=32 * 2**10, min_hours=0, jobs=1)
    rows = (tmp_path / "small" / "train.csv").read_text().splitlines()[1:]
    assert 2 <= small.train_files < 6 and small.bytes <= 32 * 2**10
    assert {row.split(",")[1] for row in rows} == {"spk0", "spk1"}  # round-robin over speakers
    with pytest.raises(BundleError, match="--force"):
        pack(corpus, tmp_path / "small", cfg, min_hours=0)


def test_device_corpus_draws_crops_of_the_files_and_a_batch_depends_only_on_its_position(tmp_path):
    # Ramps: every crop can be found in its file by value. One file is shorter than a crop.
    items = []
    for k, length in enumerate((4000, 1000, 4000, 3600)):
        path = tmp_path / f"ramp{k}.wav"
        sf.write(path, (k * 4000 + 1 + np.arange(length)).astype(np.int16), 16000, subtype="PCM_16")
        items.append(AudioItem(path, f"s{k % 2}", length / 16000))
    files = [decode(item.path, 16000) for item in items]
    repeats = np.array([2, 1, 2, 1])

    def corpus(gain_db):
        return DeviceCorpus(items, repeats, 16000, 3200, gain_db, 7, 2, torch.device("cpu"), workers=2)

    plain, louder = corpus((0.0, 0.0)), corpus((-12.0, 0.0))
    assert plain.batches_per_epoch == 6 // 2
    epoch = [plain.batch(0, i) for i in range(3)]
    assert torch.equal(plain.batch(0, 1).audio, epoch[1].audio)  # a pure function of (epoch, index)
    resumed = plain.iterate(0, 2)
    assert torch.equal(next(resumed).audio, epoch[2].audio) and next(resumed).epoch == 1
    assert plain.next_position(0, 2) == (1, 0) and not torch.equal(plain.batch(1, 0).audio, epoch[0].audio)
    crops = torch.cat([b.audio for b in epoch])[:, 0].numpy()
    seen = []
    for crop in crops * 32768:  # gain 0 dB: the file's int16 values
        nonzero = np.flatnonzero(crop)
        values = crop[nonzero[0] : nonzero[-1] + 1]
        assert np.all(values != 0) and (len(values) == 3200 or len(values) == 1000)
        matches = [
            (k, start)
            for k, audio in enumerate(files)
            for start in np.flatnonzero(audio == values[0])
            if np.array_equal(audio[start : start + len(values)], values)
        ]
        assert len(matches) == 1
        seen.append(matches[0][0])
    assert sorted(seen) == [0, 0, 1, 2, 2, 3]  # each file as often as `repeats` says in an epoch
    gained = torch.cat([louder.batch(0, i).audio for i in range(3)])[:, 0].numpy()
    ratio = gained.sum(1) / crops.sum(1)  # the same crops (the same draws), each scaled by its gain
    assert np.allclose(gained, crops * ratio[:, None], atol=1e-6) and np.all((ratio > 0.25) & (ratio <= 1))
    assert len(set(np.round(ratio, 4))) == 6 and np.abs(gained).max() <= 0.99
    faster = DeviceCorpus(
        items, repeats, 16000, 3200, (0.0, 0.0), 7, 2, torch.device("cpu"), workers=2, speed=(1.25, 1.25)
    )
    sped = torch.cat([faster.batch(0, i).audio for i in range(3)])[:, 0].numpy() * 32768
    for crop in sped:  # a ramp read 1.25 times as fast rises 1.25 per sample, within each file
        steps = np.diff(crop[np.flatnonzero(crop)])
        assert np.sum(np.abs(steps - 1.25) > 1e-3) <= 2  # but where the crop enters or leaves a file
    plain.use_data(DataConfig(gain_db=(-12.0, 0.0)))  # a new phase's crop settings
    assert torch.equal(plain.batch(0, 1).audio, louder.batch(0, 1).audio)


def _trained_state(corpus: Path, run_dir: Path) -> tuple[Trainer, dict]:
    cfg = load_config(TINY, [f"data.train={corpus}", "data.dev=null", "data.dev_fraction=0.34", "eval_every=0"])
    trainer = Trainer(cfg, run_dir)
    last = trainer.fit(until=2)
    return trainer, checkpoints.load_checkpoint(last)


def test_portable_checkpoint_is_exact_but_for_bf16_moments_and_the_float16_ema(corpus, tmp_path):
    trainer, state = _trained_state(corpus, tmp_path / "run")
    out = tmp_path / "out"
    export(trainer.ckpt_dir / "step_00000002.pt", out / "model", dtype=torch.float16)
    path = save_portable(state, out, ema_dir=out / "model", max_file_bytes=2**20 + 450_000)
    shards = sorted(out.glob("checkpoint-*.safetensors"))
    assert len(shards) >= 2 and all(p.stat().st_size <= 2**20 + 450_000 for p in shards)
    back = load_portable(path)
    assert back["step"] == 2 and back["data_position"] == state["data_position"]
    for part in ("model", "disc"):
        assert all(torch.equal(back[part][k], v) for k, v in state[part].items())
    assert back["rng"][0]["python"] == state["rng"][0]["python"]
    assert torch.equal(back["rng"][0]["torch"], state["rng"][0]["torch"])
    moments = state["gen_opt"]["state"]
    assert set(back["gen_opt"]["state"]) == set(moments) and isinstance(next(iter(moments)), int)
    for i, s in moments.items():
        torch.testing.assert_close(back["gen_opt"]["state"][i]["exp_avg_sq"], s["exp_avg_sq"], rtol=2**-8, atol=0)
        assert torch.equal(back["gen_opt"]["state"][i]["step"], s["step"])
    assert back["gen_opt"]["param_groups"] == state["gen_opt"]["param_groups"]  # betas stay tuples
    for k, v in state["ema"]["model"].items():
        torch.testing.assert_close(back["ema"]["model"][k], v, rtol=2**-10, atol=1e-4)

    resumed = Trainer(
        load_config(TINY, [f"data.train={corpus}", "data.dev=null", "data.dev_fraction=0.34", f"init_from={out}"]),
        tmp_path / "next",
    )
    assert resumed.resumed_from == path and resumed.step == 2
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in trainer.model.state_dict().items())

    # A bundle takes the config's init_from unless told otherwise: here the model exported above.
    warm = load_config(TINY, ["data.dev=null", "data.dev_fraction=0.34", f"init_from={out / 'model'}"])
    packed = pack(corpus, tmp_path / "warm", warm, min_hours=0, jobs=1)
    assert read_bundle(packed.path)["init_from"] == "init" and (packed.path / "init" / "model.safetensors").is_file()

    # A bundle packs a run directory as a portable checkpoint, and a run on it starts there.
    cfg = load_config(TINY, ["data.dev=null", "data.dev_fraction=0.34"])
    packed = pack(corpus, tmp_path / "bundle", cfg, init=str(tmp_path / "run"), min_hours=0, jobs=1)
    assert read_bundle(packed.path)["init_from"] == "init/checkpoint.json" and packed.init_bytes > 0
    parser = argparse.ArgumentParser()
    add_bundle_run_arguments(parser)
    args = parser.parse_args(run_args(packed.path, 1, tmp_path / "o", tmp_path / "w"))
    started, _ = prepare(args)
    assert started.resumed_from == packed.path / "init" / "checkpoint.json" and started.step == 2

    save_portable({**state, "step": 3}, out, ema_dir=out / "model", max_file_bytes=2**20 + 450_000)
    assert not any(p.exists() for p in shards)  # the previous save's shards go once the new one is complete
    shard = next(out.glob("checkpoint-00000003-0.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="altered"):
        load_portable(path)


def test_bundle_run_trains_on_the_cpu_and_its_model_round_trips_a_file(bundle, tmp_path, capsys):
    out = tmp_path / "out"
    code = bundle_run(run_args(bundle, 0.08, out, tmp_path / "work", *UNTIL_TIME_IS_UP))
    assert code == 0
    err = capsys.readouterr().err
    steps = int(re.search(r"trained steps 0-(\d+) in", err).group(1))
    assert steps > 0 and re.search(r"[\d.]+ steps/s, \d+ s of audio/s, peak RSS", err)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= OUT_FILES and all(p.stat().st_size <= MAX_FILE_BYTES for p in files)
    assert json.loads((out / "checkpoint.json").read_text())["step"] == steps

    release = load_model(out / "model")
    assert release.model.n_stages == 4 and release.trained
    wav = tmp_path / "speech.wav"
    sf.write(wav, speechlike(0.8, 16000, seed=3), 16000)
    api.compress(wav, tmp_path / "speech.tok", model=out / "model")
    api.decompress(tmp_path / "speech.tok", tmp_path / "restored.wav", model=out / "model")
    restored, rate = sf.read(tmp_path / "restored.wav", dtype="float32")
    assert rate == 16000 and len(restored) == 12800 and np.isfinite(restored).all() and np.abs(restored).max() > 0


def test_bundle_run_trains_the_phases_of_its_config(bundle, tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    phases = "phases=[{name: plain, steps: 2, adv: false}, {name: gan, steps: 2, data: {gain_db: [0, 0]}}]"
    assert bundle_run(run_args(bundle, 1, out, work, phases, "log_every=1")) == 0
    assert "trained steps 0-4 in" in capsys.readouterr().err
    logged = read_jsonl(work / TRAIN_LOG)
    assert [(r["step"], r["phase"]) for r in logged] == [(1, "plain"), (2, "plain"), (3, "gan"), (4, "gan")]
    assert "adv/disc" not in logged[1] and logged[2]["adv/disc"] > 0
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 4


def _bare_site(folder: Path) -> Path:
    """A site-packages of links to the files of torch, numpy, scipy, the bundle's wheels and what they require:
    what a GPU machine with only Python, CUDA PyTorch, numpy and scipy has once the wheels are installed."""
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    wanted, todo = set(), ["torch", "numpy", "scipy", *WHEELS]
    while todo:
        name = norm(todo.pop())
        if name in wanted:
            continue
        wanted.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in requires if "extra ==" not in r]
    folder.mkdir()
    for name in wanted:
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for top in {f.parts[0] for f in files} - {"..", "__pycache__"}:
            source = Path(importlib.metadata.distribution(name).locate_file(top))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
    return folder


BARE_MACHINE = """
import runpy, sys
sys.path[:0] = sys.argv[1:3]  # the checkout and the bare site-packages; python -S added no other
sys.argv = ["bundle_run", *sys.argv[3:]]
runpy.run_module("training.bundle_run", run_name="__main__")
"""


def test_a_killed_run_resumes_from_its_checkpoint_on_a_fresh_machine(bundle, tmp_path, capsys):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The first run sees only what a bare GPU machine has (torch, numpy, scipy, the bundle's wheels).
    site = _bare_site(tmp_path / "site")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-S",
            "-c",
            BARE_MACHINE,
            str(ROOT),
            str(site),
            *run_args(bundle, 2, out, tmp_path / "work1", "--checkpoint-minutes", "0.01", *UNTIL_TIME_IS_UP),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    index = out / "checkpoint.json"
    deadline = time.monotonic() + 120
    while not index.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0]
    assert index.exists(), output
    saved = json.loads(index.read_text())["step"]
    assert saved > 0 and proc.returncode == -signal.SIGKILL

    # A fresh machine: OUT copied back in, an empty work folder.
    code = bundle_run(run_args(bundle, 0.08, out, tmp_path / "work2", *UNTIL_TIME_IS_UP))
    err = capsys.readouterr().err
    assert code == 0 and f"resuming from {index} at step {saved}" in err
    assert json.loads(index.read_text())["step"] > saved
    assert checkpoints.resolve_checkpoint(out) == index
