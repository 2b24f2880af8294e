"""training.config: defaults, YAML files, dotted overrides, unknown keys and bad values."""

from pathlib import Path

import pytest
import yaml

from training.config import ConfigError, TrainConfig, config_from_dict, load_config, with_phase

CONFIGS = Path(__file__).parent.parent / "training" / "configs"


def test_overrides_convert_types_and_reach_every_section():
    cfg = load_config(
        None,
        [
            "optim.lr=3e-4",
            "model.n_stages=8",
            "loss.weights.adv/feat=4",
            "data.dev=null",
            "disc.resolutions=[[512, 128]]",
            "data.gain_db=[-3, 0]",
            "steps=1000",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model == {"n_stages": 8}
    assert cfg.loss.weights["adv/feat"] == 4.0 and cfg.loss.weights["mel"] == 15.0
    assert cfg.data.dev is None and cfg.disc.resolutions == ((512, 128),)
    assert cfg.data.gain_db == (-3.0, 0.0) and cfg.steps == 1000
    assert TrainConfig().optim.lr == pytest.approx(3e-4)  # defaults are untouched


def test_yaml_file_then_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  decay: exponential\nsteps: 50\nmodel:\n  n_stages: 6\n")
    cfg = load_config(path, ["steps=70"])
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.decay == "exponential"
    assert cfg.steps == 70 and cfg.model == {"n_stages": 6}
    assert cfg.optim.warmup_steps == TrainConfig().optim.warmup_steps  # keys the file does not name keep defaults
    assert config_from_dict(cfg.to_dict()) == cfg


def test_the_augment_section_takes_keys_and_mappings_and_survives_a_checkpoint(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  augment:\n    noise_prob: 0.2\n    noise_snr_db: [25, 40]\n")
    cfg = load_config(path, ["data.augment.band_prob=0.3", "data.augment={reverb_prob: 0.1}"])
    augment = cfg.data.augment
    assert (augment.band_prob, augment.noise_prob, augment.reverb_prob) == (0.3, 0.2, 0.1)
    assert augment.noise_snr_db == (25.0, 40.0) and augment.eq_prob == 0.0 and augment.enabled
    assert config_from_dict(cfg.to_dict()) == cfg and not TrainConfig().data.augment.enabled


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.learning_rate=1", "unknown config key 'optim.learning_rate'"),
        ("loss.weights.perceptual=1", "unknown loss weight"),
        ("model.n_stage=4", "unknown model key 'model.n_stage'"),
        ("steps=ten", "steps must be an integer"),
        ("optim.decay=linear", "choose one of"),
        ("data.gain_db=[1]", "must have 2 items"),
        ("data.gain_db=[0, -6]", "low end is above"),
        ("data.speed=[0, 1.1]", "0 < low <= high"),
        ("data.augment.noise_prob=1.5", "data.augment.noise_prob is a probability"),
        ("data.augment.reverb_rt60=[0.6, 0.1]", r"data.augment.reverb_rt60=\[0.6, 0.1\]: the low end is above"),
        ("data.augment.reverb_rt60=[0, 0.3]", "reverb_rt60 must be positive"),
        ("data.augment.snr=30", "unknown config key 'data.augment.snr'"),
        ("optim=3", "is a section"),
        ("steps", "is not key=value"),
    ],
)
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  segment_seconds: 1.0\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.segment_seconds'"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)


def test_shipped_configs_load():
    default = load_config(CONFIGS / "simvq-16k.yaml")
    assert default.data.train.endswith("train.csv") and default.data.segment_samples % 320 == 0
    assert default.data.batch_size == 16
    tiny = load_config(CONFIGS / "tiny.yaml")
    assert tiny.model["n_stages"] == 4 and tiny.steps == 4


@pytest.mark.parametrize("entry", ["simvq-codec", "python -m training"])
def test_overrides_after_an_option_still_count(entry, tmp_path, monkeypatch):
    import codec.cli
    import training.cli
    import training.train

    seen = {}
    monkeypatch.setattr(training.train, "train", lambda cfg, run_dir: seen.update(cfg=cfg, run_dir=run_dir))
    main = codec.cli.main if entry == "simvq-codec" else training.cli.main
    assert main(["train", "steps=3", "--run-dir", str(tmp_path / "run"), "seed=5", "optim.lr=0.001"]) == 0
    assert (seen["cfg"].steps, seen["cfg"].seed, seen["cfg"].optim.lr) == (3, 5, 0.001)
    assert seen["run_dir"] == tmp_path / "run"
    with pytest.raises(SystemExit):  # an unknown option is still an error
        main(["train", "steps=3", "--run-dir", str(tmp_path / "run"), "--bogus"])


RECIPE = CONFIGS / "simvq-16k.yaml"


def test_the_defaults_are_the_shipped_model():
    """SimVQCodec's defaults are the bundled model's config, and the loss defaults the run that trained it."""
    import inspect
    import json

    from codec.model import SimVQCodec
    from codec.presets import model_dir

    shipped = json.loads((model_dir("simvq-16k") / "config.json").read_text())
    defaults = {k: p.default for k, p in inspect.signature(SimVQCodec.__init__).parameters.items() if k != "self"}
    assert json.loads(json.dumps(defaults)) == shipped["model"]  # tuples as JSON lists
    trained = shipped["provenance"]["config"]["loss"]
    assert TrainConfig().loss.weights == trained["weights"]
    assert TrainConfig().loss.pitch_teacher_forcing == trained["pitch_teacher_forcing"]


def test_the_recipe_is_the_shipped_models_run():
    """The committed recipe is the run the shipped weights came from (their `provenance.config`)."""
    import json

    from codec.presets import model_dir

    shipped = json.loads((model_dir("simvq-16k") / "config.json").read_text())["provenance"]["config"]
    cfg = load_config(RECIPE)
    data = shipped["data"]
    assert (cfg.init_from, cfg.data.train, cfg.data.dev) == (shipped["init_from"], data["train"], data["dev"])
    assert cfg.to_dict()["phases"] == shipped["phases"]
    assert cfg.model == {} and (cfg.optim.lr, cfg.optim.codebook_lr_scale) == (shipped["optim"]["lr"], 10.0)


def test_phases_that_overrides_lengthen_by_name():
    two = "phases=[{name: quantizer, steps: 2000, adv: false}, {name: adversary, steps: 6000, adv: true}]"
    cfg = load_config(RECIPE, [two, "phases.adversary.steps=10", "phases.quantizer.optim.lr=2e-4"])
    quantizer, adversary = cfg.phases
    assert (quantizer.name, quantizer.steps, adversary.name, adversary.steps) == ("quantizer", 2000, "adversary", 10)
    assert quantizer.overrides == {"adv": False, "optim.lr": 2e-4} and adversary.overrides == {"adv": True}
    assert cfg.steps == 2010  # the phases together
    saved = cfg.to_dict()
    assert "steps" not in saved and saved["phases"][0]["optim"] == {"lr": 2e-4}
    assert config_from_dict(saved) == cfg
    assert with_phase(cfg, quantizer).optim.lr == 2e-4 and not with_phase(cfg, quantizer).adv
    assert with_phase(cfg, adversary).optim.lr == 1e-4 and with_phase(cfg, adversary).adv  # the run's own keys


@pytest.mark.parametrize(
    "phase, message",
    [
        ("{name: a, steps: 5, model: {n_stages: 2}}", "phases.a.model.n_stages is part of the model"),
        ("{name: a, steps: 5, model: {codebook_size: 256}}", "phases.a.model.codebook_size is part of the model"),
        ("{name: a, steps: 5, data: {batch_size: 8}}", "phases.a.data.batch_size holds for the whole run"),
        ("{name: a, steps: 5, disc: {mrd_channels: 8}}", "phases.a.disc.mrd_channels holds for the whole run"),
        ("{name: a, steps: 5, optim: {rate: 1}}", "phases.a: unknown config key 'optim.rate'"),
        ("{name: a, steps: 5, optim: {decay: linear}}", "phase 'a': optim.decay='linear': choose one of"),
        ("{name: a, steps: 0}", "phases.a.steps must be at least 1"),
        ("{name: a}", "needs steps"),
        ("{steps: 5}", "must be a mapping with a name and steps"),
        ("{name: a.b, steps: 5}", "must be letters, digits"),
    ],
)
def test_phases_may_change_only_what_a_run_may_change(phase, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"phases=[{phase}]"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["phases=[{name: a, steps: 2}, {name: a, steps: 3}]"], "a name of its own"),
        (["phases=[{name: a, steps: 2}]", "phases.b.steps=3"], "no phase named 'b'"),
        (["phases=[{name: a, steps: 2}]", "steps=3"], "the phases add up to 2"),
        (["adv_start_step=100"], "adv_start_step is gone"),
        (["model.rephase_iters=1", "model.rephase_hears=own"], "rephase_hears='own' is gone"),
    ],
)
def test_phase_overrides_and_retired_keys_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_config_saved_before_phases_reads_as_it_trained(tmp_path):
    """`adv_start_step` N of an earlier run's saved config: 0 and N >= steps are `adv`; between, a phase without
    the adversary and one with it on one schedule; the retired model option with its surviving value goes."""
    from training.phases import phase_spans

    old = TrainConfig().to_dict()
    del old["adv"], old["phases"]
    old["model"] = {"rephase_iters": 1, "rephase_hears": "played"}
    assert config_from_dict({**old, "adv_start_step": 0, "steps": 50}).adv
    assert not config_from_dict({**old, "adv_start_step": 50, "steps": 50}).adv
    cfg = config_from_dict({**old, "adv_start_step": 20, "steps": 50})
    assert cfg.model == {"rephase_iters": 1} and cfg.steps == 50
    plain, adversarial = phase_spans(cfg)
    assert (plain.adversarial, plain.start, plain.end) == (False, 0, 20)
    assert (adversarial.adversarial, adversarial.start, adversarial.end) == (True, 20, 50)
    assert (adversarial.schedule_start, adversarial.schedule_end, adversarial.adv_start) == (0, 50, 20)
    saved = tmp_path / "config.yaml"  # an earlier run directory's config, as `train --run-dir` reads it
    saved.write_text(yaml.safe_dump({**old, "adv_start_step": 20, "steps": 50}))
    with pytest.warns(UserWarning, match="adv_start_step is read as adv or phases"):
        assert load_config(saved) == cfg
