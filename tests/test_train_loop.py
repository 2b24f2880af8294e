"""training.train: adversarial steps, exact resume, the non-finite guard, checkpoints and export."""

import math
import re
from pathlib import Path

import pytest
import torch

from codec.checkpoint import load_model_dir, load_pretrained
from codec.errors import AudioError, CheckpointError
from tests.conftest import speechlike, write_ood_manifest, write_speaker_corpus
from training import checkpoints
from training.cli import main as cli_main
from training.config import ConfigError, load_config
from training.export import export
from training.monitor import DEV_LOG, TRAIN_LOG, read_jsonl
from training.train import Trainer

TINY = Path(__file__).parent.parent / "training" / "configs" / "tiny.yaml"
VOLATILE = ("time", "perf/steps_per_s")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three speakers of generated speech-like audio at 16, 22.05 and 8 kHz."""
    return write_speaker_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_config(corpus: Path, *overrides: str):
    return load_config(TINY, [f"data.train={corpus}", "data.dev=null", "data.dev_fraction=0.34", *overrides])


def losses(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in read_jsonl(run_dir / TRAIN_LOG)}


def test_resume_after_two_adversarial_steps_matches_an_uninterrupted_run(corpus, tmp_path):
    cfg = tiny_config(corpus, "eval_every=3")
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit()
    first = Trainer(cfg, tmp_path / "resumed")
    assert first.fit(until=2).name == "step_00000002.pt"
    second = Trainer(cfg, tmp_path / "resumed")
    assert second.resumed_from.name == "step_00000002.pt" and second.step == 2
    second.fit()

    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert a[1]["adv/disc"] > 0 and a[2]["adv/gen"] > 0  # adversarial from the first step (adv_start_step=0)
    for step in (3, 4):
        assert b[step] == a[step]  # bit-identical losses, gradient norms and learning rates
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    dev_a, dev_b = read_jsonl(tmp_path / "straight" / DEV_LOG), read_jsonl(tmp_path / "resumed" / DEV_LOG)
    assert [r["step"] for r in dev_a] == [3, 4] and [r["step"] for r in dev_b] == [2, 3, 4]  # + one at the stop
    assert dev_b[1:] == dev_a


def test_nonfinite_loss_or_gradients_skip_the_update_and_are_counted(corpus, tmp_path):
    trainer = Trainer(tiny_config(corpus, "eval_every=0"), tmp_path / "run")
    loader, _ = trainer._loader()
    batches = iter(loader)
    trainer.train_step(next(batches).audio)
    gen_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.ema.model.state_dict().items()}

    mel = trainer.mel_loss
    trainer.mel_loss = lambda output, target: mel(output, target) * float("nan")
    scalars = trainer.train_step(next(batches).audio)
    trainer.mel_loss = mel
    assert scalars["skipped/gen"] == 1 and scalars["skipped/disc"] == 0
    # Weights stay; the whiteners' running statistics follow the (finite) forward pass, like BatchNorm's.
    kept = [k for k in gen_before if ".whitener." not in k]
    assert all(torch.equal(gen_before[k], trainer.model.state_dict()[k]) for k in kept)
    assert all(torch.equal(ema_before[k], trainer.ema.model.state_dict()[k]) for k in kept)

    disc_before = {k: v.clone() for k, v in trainer.disc.state_dict().items()}
    weight = next(trainer.disc.parameters())
    hook = weight.register_hook(lambda grad: grad * float("inf"))
    scalars = trainer.train_step(next(batches).audio)
    hook.remove()
    assert scalars["skipped/disc"] == 1 and scalars["skipped/gen"] == 1  # the generator step went through
    assert all(torch.equal(v, trainer.disc.state_dict()[k]) for k, v in disc_before.items())
    assert not torch.equal(gen_before["decoder_in.weight"], trainer.model.state_dict()["decoder_in.weight"])

    scalars = trainer.train_step(next(batches).audio)
    assert scalars["skipped/gen"] == 1 and scalars["skipped/disc"] == 1 and all(v == v for v in scalars.values())
    assert trainer.state_dict()["skipped"] == {"gen": 1, "disc": 1}


def test_checkpoints_keep_last_k_and_export_loads(corpus, tmp_path):
    run = tmp_path / "run"
    assert (
        cli_main(
            [
                "train",
                "--config",
                str(TINY),
                "--run-dir",
                str(run),
                f"data.train={corpus}",
                "data.dev=null",
                "data.dev_fraction=0.34",
                "steps=6",
                "ckpt_every=2",
                "keep_last=2",
                "eval_every=3",
            ]
        )
        == 0
    )
    names = [p.name for p in checkpoints.list_checkpoints(run / "checkpoints")]
    assert names == ["step_00000004.pt", "step_00000006.pt"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006.pt"
    dev = read_jsonl(run / DEV_LOG)
    assert [r["step"] for r in dev] == [3, 6] and len(dev[0]["utilisation"]) == 4
    assert all(0 < u <= 1 for u in dev[-1]["utilisation"]) and all(p >= 1 for p in dev[-1]["perplexity"])
    assert any(p.name.startswith("events") for p in (run / "tb").iterdir())

    out = tmp_path / "model"
    assert cli_main(["export", str(run), str(out)]) == 0
    release = load_pretrained(out)
    model = release.model
    state = checkpoints.load_checkpoint(run / "checkpoints" / "step_00000006.pt")
    for name, tensor in state["ema"]["model"].items():
        assert torch.equal(model.state_dict()[name], tensor), name
    config = __import__("json").loads((out / "config.json").read_text())
    assert config["provenance"]["steps"] == 6 and config["provenance"]["corpus"]["train_files"] == 6
    assert config["model"]["n_stages"] == 4 and release.trained
    assert cli_main(["export", str(run), str(out)]) == 2  # no overwrite without --force
    assert cli_main(["export", str(run), str(out), "--force", "--weights", "live"]) == 0
    live = load_model_dir(out)
    assert all(torch.equal(live.state_dict()[name], t) for name, t in state["model"].items())
    assert any(not torch.equal(state["model"][name], t) for name, t in state["ema"]["model"].items())
    assert __import__("json").loads((out / "config.json").read_text())["provenance"]["weights"] == "live"
    codes = model.encode(torch.from_numpy(speechlike(0.4))[None, None])
    assert codes.shape == (1, 4, 20)


def test_resume_refuses_another_model_and_bad_checkpoints(corpus, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(corpus, "eval_every=0"), run).fit(until=2)
    with pytest.raises(ConfigError, match="use a new --run-dir"):
        Trainer(tiny_config(corpus, "eval_every=0", "model.n_stages=3"), run)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load"):
        checkpoints.load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        export(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(CheckpointError, match="'no-such-model' is neither an installed model id"):
        checkpoints.resolve_init("no-such-model")


def test_init_from_starts_a_new_run_from_a_checkpoint_of_another_config(corpus, tmp_path):
    source = tmp_path / "source"
    Trainer(tiny_config(corpus, "eval_every=0"), source).fit(until=2)
    saved = checkpoints.load_checkpoint(checkpoints.resolve_checkpoint(source))
    # model.phase changes what the decoder's outputs mean, not any parameter's shape
    changed = ("eval_every=0", "model.phase=absolute", f"init_from={source}")
    with pytest.warns(UserWarning, match="init_from"):
        warm = Trainer(tiny_config(corpus, *changed), tmp_path / "warm")
    assert warm.step == 2 and warm.model.synthesis.phase == "absolute"
    assert all(torch.equal(warm.model.state_dict()[k], v) for k, v in saved["model"].items())
    warm.fit(until=3)
    assert (tmp_path / "warm" / "checkpoints" / "step_00000003.pt").is_file()
    # once the new run has its own checkpoint, it resumes from that, not from init_from
    again = Trainer(tiny_config(corpus, *changed), tmp_path / "warm")
    assert again.step == 3
    with pytest.raises(CheckpointError, match="does not fit"), pytest.warns(UserWarning, match="init_from"):
        Trainer(tiny_config(corpus, "eval_every=0", "model.n_stages=3", f"init_from={source}"), tmp_path / "other")


def test_init_from_a_released_model_takes_its_weights_and_starts_at_step_zero(corpus, tmp_path):
    source = tmp_path / "source"
    Trainer(tiny_config(corpus, "eval_every=0"), source).fit(until=2)
    released = export(source, tmp_path / "release", model_id="tiny")
    warm = Trainer(tiny_config(corpus, "eval_every=0", f"init_from={released}"), tmp_path / "warm")
    expected = load_model_dir(released).state_dict()
    assert warm.step == 0 and warm.elapsed == 0
    for weights in (warm.model.state_dict(), warm.ema.model.state_dict()):
        assert all(torch.equal(weights[k], v) for k, v in expected.items())
    assert not warm.gen_opt.state  # a fresh optimiser
    warm.fit(until=1)
    assert Trainer(tiny_config(corpus, "eval_every=0", f"init_from={released}"), tmp_path / "warm").step == 1


def test_a_released_model_grows_a_pitch_head_that_trains_against_the_pitch_track(corpus, tmp_path):
    source = tmp_path / "source"
    Trainer(tiny_config(corpus, "eval_every=0", "model.phase=propagated"), source).fit(until=1)
    released = export(source, tmp_path / "release", model_id="tiny")
    pitch = ["model.phase=propagated", "model.pitch_prior=true", f"init_from={released}", "eval_every=2"]
    with pytest.warns(UserWarning, match="new modules start fresh: pitch_head"):
        warm = Trainer(tiny_config(corpus, *pitch), tmp_path / "warm")
    expected = load_model_dir(released).state_dict()
    assert all(torch.equal(warm.model.state_dict()[k], v) for k, v in expected.items())
    warm.fit(until=2)
    logged = losses(tmp_path / "warm")
    assert all(logged[s]["pitch/f0"] > 0 and logged[s]["pitch/voicing"] > 0 for s in (1, 2))
    [dev] = read_jsonl(tmp_path / "warm" / DEV_LOG)
    assert 0 <= dev["voicing_accuracy"] <= 1 and dev["f0_error_cents"] >= 0
    assert "pitch/f0" not in losses(source)[1]  # a model without the head has no pitch terms
    audio = torch.from_numpy(speechlike(0.2))[None, None]
    prior_f0, track, voiced = warm._pitch_inputs(audio)
    assert torch.equal(prior_f0, track) and voiced.any()  # by default (teacher forcing) the track drives the prior
    warm.cfg.loss.pitch_teacher_forcing = 0.0
    assert warm._pitch_inputs(audio)[0].isnan().all()  # without it, the head's own f0
    with pytest.raises(CheckpointError, match="does not fit"):  # new modules may start fresh, changed ones not
        Trainer(tiny_config(corpus, *pitch, "model.decoder_dim=48"), tmp_path / "wider")


def _tiny_release(corpus, tmp_path, *overrides: str) -> Path:
    """A tiny model trained one step and exported as a release (a model directory)."""
    source = tmp_path / "source"
    Trainer(tiny_config(corpus, "eval_every=0", *overrides), source).fit(until=1)
    return export(source, tmp_path / "release", model_id="tiny")


def test_a_released_model_grows_a_deeper_decoder_that_starts_as_the_released_one(corpus, tmp_path):
    released = _tiny_release(corpus, tmp_path)
    with pytest.warns(UserWarning, match=r"new modules start fresh: decoder\.2, decoder\.3"):
        deeper = Trainer(
            tiny_config(corpus, "eval_every=0", "model.decoder_layers=4", f"init_from={released}"), tmp_path / "deeper"
        )
    audio = torch.from_numpy(speechlike(0.2))[None, None]
    old, new = load_model_dir(released).eval(), deeper.model.eval()
    with torch.no_grad():
        assert torch.equal(new(audio).audio, old(audio).audio)  # the new blocks start as the identity
    assert all(deeper.model.decoder[i].scale.abs().sum() == 0 for i in (2, 3))
    deeper.fit(until=1)
    assert all(deeper.model.decoder[i].scale.abs().sum() > 0 for i in (2, 3))  # and then they train
    with pytest.raises(CheckpointError, match="does not fit"):  # fewer blocks than the release: refused
        Trainer(
            tiny_config(corpus, "eval_every=0", "model.decoder_layers=1", f"init_from={released}"),
            tmp_path / "shallower",
        )


def test_a_released_model_grows_advance_features_that_start_unheard(corpus, tmp_path):
    """The encoder's input projection gains zero weights for the appended advance features: the grown model
    first encodes exactly as the release did, then learns to listen to them."""
    released = _tiny_release(corpus, tmp_path, "model.advance_features=false")
    with pytest.warns(UserWarning, match=r"encoder_in\.0\.weight grows from"):
        grown = Trainer(
            tiny_config(corpus, "eval_every=0", "model.advance_features=true", f"init_from={released}"),
            tmp_path / "grown",
        )
    audio = torch.from_numpy(speechlike(0.2))[None, None]
    old, new = load_model_dir(released).eval(), grown.model.eval()
    with torch.no_grad():
        assert torch.equal(new.encode_latents(audio), old.encode_latents(audio))
    heard = old.features.out_dim
    assert grown.model.encoder_in[0].weight[:, heard:].abs().sum() == 0
    grown.fit(until=1)
    assert grown.model.encoder_in[0].weight[:, heard:].abs().sum() > 0


def test_dev_pass_reports_the_unquantized_latent_the_low_rates_and_the_convergence_beside_the_codes(corpus, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(corpus, "eval_every=1", "model.quantize_fraction=0", "dev_stages=[3,1,4]"), run).fit(until=1)
    [record] = read_jsonl(run / DEV_LOG)
    assert record["mel_unquantized"] > 0 and record["mel_unquantized"] != record["mel"]
    assert 0 < record["convergence"] < 10  # an untrained decoder is far off, but finite
    at = record["mel_at_stages"]
    assert list(at) == ["1", "3"]  # in order; 4 is every stage of the tiny model, which `mel` already is
    assert len({at["1"], at["3"], record["mel"]}) == 3 and all(v > 0 for v in at.values())


def test_an_out_of_domain_dev_set_is_scored_at_every_pass_and_logged_apart(corpus, tmp_path, capsys):
    ood = write_ood_manifest(tmp_path)
    plain = Trainer(tiny_config(corpus, "eval_every=1"), tmp_path / "plain")
    last = plain.fit(until=1)
    plain_line = capsys.readouterr().err
    both = Trainer(tiny_config(corpus, "eval_every=1", f"data.dev_ood={ood}"), tmp_path / "both")
    both.fit(until=1)
    both_line = capsys.readouterr().err

    [without] = read_jsonl(tmp_path / "plain" / DEV_LOG)
    [record] = read_jsonl(tmp_path / "both" / DEV_LOG)
    figures = record.pop("ood")
    assert record == without  # the main dev set's figures (and the step's training) are untouched
    assert set(figures) == set(record) - {"step", "phase"} and len(figures["utilisation"]) == 4
    assert math.isfinite(figures["mel"]) and figures["mel"] > 0 and figures["mel"] != record["mel"]
    assert figures["mel_unquantized"] != record["mel_unquantized"]
    assert list(figures["mel_at_stages"]) == list(record["mel_at_stages"]) == ["2"]  # 5 is past the tiny model's 4
    two = figures["mel_at_stages"]["2"]
    ood_text = f"ood mel {figures['mel']:.3f} (2 stages {two:.3f}, unquantized {figures['mel_unquantized']:.3f})"
    assert f"dev step 1 (train): mel {record['mel']:.3f}" in both_line and both_line.rstrip().endswith(ood_text)
    assert "ood" not in plain_line and f"dev step 1 (train): mel {record['mel']:.3f}" in plain_line

    corpus_record = checkpoints.load_checkpoint(both.ckpt_dir / last.name)["corpus"]
    assert (corpus_record["dev_ood"], corpus_record["dev_ood_files"]) == (str(ood), 4)
    assert "dev_ood" not in checkpoints.load_checkpoint(last)["corpus"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(tmp_path / "both" / "tb")).Reload().Tags()["scalars"]
    assert {"dev-ood/mel", "dev-ood/mel_unquantized", "dev-ood/convergence", "dev-ood/utilisation/mean"} <= set(tags)
    assert {"dev/mel_2_stages", "dev-ood/mel_2_stages"} <= set(tags) and "dev/mel_5_stages" not in tags
    assert "dev-ood/perplexity/stage_03" in tags and "dev/mel" in tags
    with pytest.raises(AudioError, match=r"data.dev_ood: no folder or manifest at .*data.dev_ood=null"):
        Trainer(tiny_config(corpus, f"data.dev_ood={tmp_path / 'none.csv'}"), tmp_path / "none")


def test_the_linear_stft_term_is_computed_only_when_weighted(corpus, tmp_path):
    for weight in (2, 0):
        Trainer(tiny_config(corpus, f"loss.weights.stft/linear={weight}"), tmp_path / str(weight)).fit(until=1)
    assert read_jsonl(tmp_path / "2" / TRAIN_LOG)[0]["stft/linear"] > 0
    assert "stft/linear" not in read_jsonl(tmp_path / "0" / TRAIN_LOG)[0]


def test_segment_must_be_whole_frames(corpus, tmp_path):
    with pytest.raises(ConfigError, match="multiple of the hop"):
        Trainer(tiny_config(corpus, "data.segment_samples=3000"), tmp_path / "run")


def test_time_limit_stops_with_a_checkpoint_and_a_dev_pass(corpus, tmp_path):
    run = tmp_path / "run"
    last = Trainer(tiny_config(corpus, "max_minutes=0.0001", "eval_every=100"), run).fit()
    assert last.name == "step_00000001.pt"
    assert [r["step"] for r in read_jsonl(run / DEV_LOG)] == [1]
    resumed = Trainer(tiny_config(corpus, "eval_every=100"), run)
    assert resumed.step == 1 and resumed.elapsed > 0


def test_untrained_discriminators_may_change_on_resume_trained_ones_may_not(corpus, tmp_path):
    run = tmp_path / "run"
    phases = ("eval_every=0", "phases=[{name: plain, steps: 3, adv: false}, {name: adv, steps: 1}]")
    Trainer(tiny_config(corpus, *phases), run).fit(until=2)
    with pytest.warns(UserWarning, match="start fresh"):
        resumed = Trainer(tiny_config(corpus, *phases, "disc.mrd_channels=8"), run)
    assert resumed.step == 2
    resumed.fit(until=4)  # trains the new discriminators from step 3
    with pytest.raises(CheckpointError, match="do not match disc"):
        Trainer(tiny_config(corpus, *phases, "disc.mrd_channels=4"), run)


def test_codebook_learning_rate_multiplier_applies_and_follows_the_config_on_resume(corpus, tmp_path):
    run = tmp_path / "run"
    first = Trainer(tiny_config(corpus, "eval_every=0", "optim.codebook_lr_scale=10"), run)
    first.fit(until=2)
    base, books = first.gen_opt.param_groups
    assert books["lr"] == pytest.approx(10 * base["lr"]) and base["lr"] > 0
    resumed = Trainer(tiny_config(corpus, "eval_every=0", "optim.codebook_lr_scale=3"), run)
    assert resumed.step == 2
    resumed.fit(until=3)
    base, books = resumed.gen_opt.param_groups
    assert books["lr"] == pytest.approx(3 * base["lr"]) and base["lr"] > 0


def test_a_released_model_takes_a_larger_first_codebook_with_the_rest_kept(corpus, tmp_path):
    released = _tiny_release(corpus, tmp_path)
    sizes = "model.codebook_size=[256, 64, 64, 64]"
    with pytest.warns(UserWarning, match="new codebooks, maps kept: quantizer.stages.0"):
        warm = Trainer(tiny_config(corpus, "eval_every=0", sizes, f"init_from={released}"), tmp_path / "large")
    expected, own = load_model_dir(released).state_dict(), warm.model.state_dict()
    fresh = ("frozen_codebook", "proj.weight", "proj.bias", "initialized")
    for key, value in expected.items():
        if key.removeprefix("quantizer.stages.0.") in fresh:
            assert own[key].shape != value.shape or not torch.equal(own[key], value), key
        else:
            assert torch.equal(own[key], value), key  # every other weight, the stage's maps included
    assert own["quantizer.stages.0.frozen_codebook"].shape[0] == 256 and not bool(own["quantizer.stages.0.initialized"])
    warm.fit(until=1)
    assert bool(warm.model.quantizer.stages[0].initialized)  # searched as from scratch: data-dependent init


@pytest.mark.parametrize("space", ["wider", "the latent itself, unwhitened"])
def test_a_released_model_takes_another_lookup_space_with_its_stages_fresh_and_the_rest_kept(corpus, tmp_path, space):
    released = _tiny_release(corpus, tmp_path)
    expected = load_model_dir(released).state_dict()
    looked = expected["quantizer.stages.0.in_proj.weight"].shape[0]
    lookup = (
        [f"model.code_dim={2 * looked}"] if space == "wider" else ["model.code_dim=null", "model.whiten_codes=false"]
    )
    with pytest.warns(UserWarning, match="new lookup space, whole stages fresh: quantizer.stages.0, ") as caught:
        warm = Trainer(
            tiny_config(corpus, "eval_every=0", *lookup, f"init_from={released}"),
            tmp_path / "wide",
        )
    assert not any("new modules" in str(w.message) for w in caught)  # the quantizer is not a new module
    own = warm.model.state_dict()
    for key, value in expected.items():
        if key.startswith("quantizer.stages."):
            assert key not in own or own[key].shape != value.shape or not torch.equal(own[key], value), key
        else:
            assert torch.equal(own[key], value), key  # the encoder and the decoder carry over
    if space == "wider":
        assert own["quantizer.stages.0.in_proj.weight"].shape[0] == 2 * looked
    else:
        assert not any(".in_proj." in key or ".whitener." in key for key in own)
    warm.fit(until=1)
    assert all(bool(stage.initialized) for stage in warm.model.quantizer.stages)


PHASES = (
    "phases=[{name: twin, steps: 2, adv: false, model: {quantize_fraction: 0}, optim: {lr: 1.0e-3}},"
    " {name: gan, steps: 2, data: {gain_db: [-3, 0]}, optim: {warmup_steps: 2}}]"
)


def test_phases_train_in_order_each_with_its_settings_schedule_and_name_in_the_logs(corpus, tmp_path):
    cfg = tiny_config(corpus, PHASES, "eval_every=100", "ckpt_every=100")
    straight = Trainer(cfg, tmp_path / "straight")
    assert straight.model.quantizer.quantize_fraction == 0 and straight.dataset.gain_db == (-12.0, 0.0)
    straight.fit()
    assert straight.model.quantizer.quantize_fraction == 0.5 and straight.dataset.gain_db == (-3.0, 0.0)
    logged = losses(tmp_path / "straight")
    assert [logged[s]["phase"] for s in (1, 2, 3, 4)] == ["twin", "twin", "gan", "gan"]
    assert "adv/disc" not in logged[2] and logged[3]["adv/disc"] > 0  # the adversary from the second phase on
    assert logged[1]["lr/gen"] == pytest.approx(1e-3 / 2)  # its own warm-up (tiny.yaml: 2 steps) and peak
    assert logged[3]["lr/gen"] == pytest.approx(3e-4 / 2) and logged[4]["lr/gen"] == pytest.approx(3e-4)  # again
    assert logged[3]["lr/disc"] == pytest.approx(3e-4 / 2)
    # each phase ends with a dev pass and a checkpoint
    assert [(r["step"], r["phase"]) for r in read_jsonl(tmp_path / "straight" / DEV_LOG)] == [(2, "twin"), (4, "gan")]
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "straight" / "checkpoints")] == [
        "step_00000002.pt",
        "step_00000004.pt",
    ]

    Trainer(cfg, tmp_path / "resumed").fit(until=3)  # stopped in the middle of the second phase
    resumed = Trainer(cfg, tmp_path / "resumed")
    assert resumed.step == 3 and resumed.phase.name == "gan" and resumed.model.quantizer.quantize_fraction == 0.5
    resumed.fit()
    assert losses(tmp_path / "resumed")[4] == logged[4]  # bit-identical to the uninterrupted run


@pytest.mark.parametrize(
    "recipe, phase, quantizer",
    [
        # the bundled model's: one phase that decodes more crops from codes and from fewer stages
        ("simvq-16k.yaml", "polish", {"quantize_fraction": 0.8, "quantizer_dropout": 0.8}),
        # the fourth release's: its first phase draws every stage's codes from its inputs
        ("simvq-16k-v4.yaml", "quantizer", {"quantize_fraction": 0.5, "quantizer_dropout": 0.5}),
    ],
)
def test_the_recipes_warm_start_from_a_release_and_train_their_phases(
    recipe, phase, quantizer, corpus, tmp_path, capsys
):
    """A committed recipe with the tiny model and two steps, from a tiny release."""
    import json

    import yaml

    released = _tiny_release(corpus, tmp_path)
    tiny = yaml.safe_load(TINY.read_text())
    sections = [f"{key}={json.dumps(tiny[key])}" for key in ("model", "data", "disc", "loss")]
    cfg = load_config(
        Path(__file__).parent.parent / "training" / "configs" / recipe,
        [
            *sections,
            f"data.train={corpus}",
            "data.dev=null",
            "data.dev_ood=null",  # the recipe's is the built corpus's
            "data.dev_fraction=0.34",
            f"init_from={released}",
            f"phases.{phase}.steps=2",
            "log_every=1",
        ],
    )
    trainer = Trainer(cfg, tmp_path / "recipe")
    expected = load_model_dir(released).state_dict()
    assert trainer.step == 0 and all(torch.equal(trainer.model.state_dict()[k], v) for k, v in expected.items())
    trainer.fit(until=2)
    logged = losses(tmp_path / "recipe")
    assert (logged[1]["phase"], logged[2]["phase"]) == (phase, phase)
    assert "adv/disc" not in logged[1] and "adv/disc" not in logged[2]  # no adversary
    assert logged[1]["lr/gen"] == pytest.approx(1e-4 / 200) and logged[2]["lr/gen"] > logged[1]["lr/gen"]
    assert {name: getattr(trainer.model.quantizer, name) for name in quantizer} == quantizer
    drew = "drew the codes of stage(s) 1, 2, 3, 4 from" in capsys.readouterr().err  # at the phase's first step
    assert drew == (phase == "quantizer")


def test_a_phase_can_redraw_only_the_codes_no_crop_selects(corpus, tmp_path, capsys):
    released = _tiny_release(corpus, tmp_path)
    phases = ["phases=[{name: refresh, steps: 4, draw_codebooks: unused}]"]
    trainer = Trainer(tiny_config(corpus, "eval_every=0", f"init_from={released}", *phases), tmp_path / "unused")
    stages = trainer.model.quantizer.stages
    stages[0].frozen_codebook[:5] += 100.0  # five codes far from every input
    before = [s.frozen_codebook.clone() for s in stages]
    trainer.fit(until=1)
    report = re.search(r"redrew the codes no frame of \d+ selects, per stage: (.*)", capsys.readouterr().err)
    moved = [int(count.split("/")[0]) for count in report[1].split(", ")]
    assert len(moved) == len(stages) and moved[0] >= 5
    assert (stages[0].frozen_codebook[:5] != before[0][:5]).any(1).all()  # the five far codes among them
    for stage, codes, n in zip(stages, before, moved):  # exactly the reported rows of C moved
        assert int((stage.frozen_codebook != codes).any(1).sum()) == n
    assert torch.equal(trainer.ema.model.quantizer.stages[0].frozen_codebook, stages[0].frozen_codebook)


def test_a_phase_draws_its_codebooks_from_the_latents_of_training_crops(corpus, tmp_path, capsys):
    released = _tiny_release(corpus, tmp_path)
    phases = ["phases=[{name: quantizer, steps: 2, draw_codebooks: all}, {name: more, steps: 2}]"]
    trainer = Trainer(tiny_config(corpus, "eval_every=0", f"init_from={released}", *phases), tmp_path / "drawn")
    before = [s.frozen_codebook.clone() for s in trainer.model.quantizer.stages]
    trainer.fit(until=1)
    assert "drew the codes of stage(s) 1, 2, 3, 4 from" in capsys.readouterr().err
    stages = trainer.model.quantizer.stages
    assert all(not torch.equal(s.frozen_codebook, b) for s, b in zip(stages, before))
    assert torch.equal(trainer.ema.model.quantizer.stages[0].frozen_codebook, stages[0].frozen_codebook)
    drawn = [s.frozen_codebook.clone() for s in stages]
    trainer.fit(until=3)  # the next phase does not draw: its codes are the ones drawn
    assert all(torch.equal(s.frozen_codebook, d) for s, d in zip(stages, drawn))
    again = Trainer(tiny_config(corpus, "eval_every=0", f"init_from={released}", *phases), tmp_path / "again")
    again.fit(until=1)  # the same seed draws the same codes
    assert torch.equal(again.model.quantizer.stages[2].frozen_codebook, drawn[2])


def test_the_saved_average_is_whitened_on_calibration_crops_not_on_the_last_batch(corpus, tmp_path):
    from training.train import CALIBRATION_BATCHES, CALIBRATION_EPOCH

    trainer = Trainer(tiny_config(corpus), tmp_path / "run")
    last = trainer.fit(until=2)
    saved = checkpoints.load_checkpoint(last)["ema"]["model"]
    trainer.ema.model.load_state_dict(saved)
    crops = list(trainer._side_batches(CALIBRATION_EPOCH, CALIBRATION_BATCHES))
    assert len(crops) == CALIBRATION_BATCHES and all(
        torch.equal(a, b) for a, b in zip(crops, trainer._side_batches(CALIBRATION_EPOCH, CALIBRATION_BATCHES))
    )
    key = "quantizer.stages.0.whitener.mean"
    trainer.ema.calibrate(crops)
    assert torch.allclose(trainer.ema.model.state_dict()[key], saved[key], atol=1e-6)
    trainer.ema.calibrate(crops[:1])
    assert not torch.allclose(trainer.ema.model.state_dict()[key], saved[key], atol=1e-4)
