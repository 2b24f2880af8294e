"""eval.collapse: the collapse measures on known inputs, and a two-step study end to end on generated audio."""

import csv
import json
import math
from pathlib import Path

import pytest
import soundfile as sf
import torch

from eval import collapse_metrics
from eval.collapse import RUNS, SUMMARY, RunSpec, eval_schedule, main, plan, scale_codebook
from eval.collapse_metrics import DevSet, effective_rank, measure, usage
from eval.collapse_report import uniform_coverage
from tests.conftest import speechlike, tiny_codec


def test_uniform_codes_use_everything_with_perplexity_k_and_one_code_gives_one():
    k = 256
    assert usage(torch.full((k,), 7)) == pytest.approx((1.0, k))
    one = torch.zeros(k, dtype=torch.long)
    one[3] = 1000
    assert usage(one) == pytest.approx((1 / k, 1.0))
    half = torch.zeros(k, dtype=torch.long)
    half[::2] = 5
    assert usage(half) == pytest.approx((0.5, k / 2))
    with pytest.raises(ValueError, match=r"\[K\]"):
        usage(torch.ones(2, k))


def test_effective_rank_counts_the_directions_the_data_spreads_in():
    g = torch.Generator().manual_seed(0)
    line = torch.randn(500, 1, generator=g) * torch.randn(1, 16, generator=g)  # rank 1
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-4)
    assert effective_rank(line + 3.0) == pytest.approx(1.0, abs=1e-4)  # a shared offset is not a direction
    orthonormal, _ = torch.linalg.qr(torch.randn(400, 8, generator=g))
    assert effective_rank(orthonormal, center=False) == pytest.approx(8.0, abs=1e-6)  # equal singular values
    two = torch.cat([orthonormal[:, :2] * 5, torch.zeros(400, 6)], 1)
    assert effective_rank(two, center=False) == pytest.approx(2.0, abs=1e-6)
    assert 15.0 < effective_rank(torch.randn(20000, 16, generator=g)) <= 16.0
    assert effective_rank(torch.zeros(10, 4)) == 0.0


def test_uniform_coverage_is_the_ceiling_of_a_finite_dev_set():
    assert uniform_coverage(0, 1024) == 0.0
    assert uniform_coverage(1024, 1024) == pytest.approx(1 - math.exp(-1), rel=1e-3)
    assert uniform_coverage(1, 1024) == pytest.approx(1 / 1024)
    assert uniform_coverage(10**6, 1024) == pytest.approx(1.0)


def test_measure_matches_the_models_own_codes_clip_by_clip(monkeypatch):
    monkeypatch.setattr(collapse_metrics, "SEARCH_ELEMENTS", 64 * 7)  # 7 frames per search chunk
    model = tiny_codec(n_stages=1, codebook_size=64, quantizer="vq")
    hop = model.hop_length
    clips = [
        torch.from_numpy(speechlike(s, seed=i))[None, : int(s * 16000) // hop * hop]
        for i, s in enumerate((0.5, 1.3, 0.2, 0.9))
    ]
    result = measure(model.train(), DevSet(clips, mel_clips=0), batch_size=3)  # padded batches of 3 and 1
    assert model.training  # the caller's mode is restored
    counts = torch.zeros(64, dtype=torch.long)
    latents = []
    for clip in clips:
        counts += torch.bincount(model.encode(clip[None]).flatten(), minlength=64)
        latents.append(model.encode_latents(clip[None])[0])
    assert result.frames == sum(c.shape[-1] // hop for c in clips) == int(counts.sum())
    assert result.used == int((counts > 0).sum())
    assert (result.utilisation, result.perplexity) == pytest.approx(usage(counts))
    assert result.latent_rank == pytest.approx(effective_rank(torch.cat(latents).detach()), rel=1e-4)
    assert result.codebook_rank == pytest.approx(effective_rank(model.quantizer.stages[0].codes), rel=1e-6)
    assert math.isnan(result.mel)


@pytest.mark.parametrize("kind", ["vq", "simvq"])
def test_scale_codebook_multiplies_the_initial_codes_and_data_init_keeps_the_factor(kind):
    base, scaled = (tiny_codec(n_stages=1, quantizer=kind, init_from_data=True) for _ in range(2))
    scale_codebook(scaled, 10.0)
    a, b = base.quantizer.stages[0], scaled.quantizer.stages[0]
    assert torch.allclose(b.codebook(), 10 * a.codebook(), atol=1e-6)
    z = torch.randn(500, a.code_dim) * 0.3 + 1.0  # lookup-space input
    for stage in (a, b):
        stage._init_from_data(z)
    centred = lambda s: s.codebook().detach() - z.mean(0)  # noqa: E731
    assert float(centred(b).std() / centred(a).std()) == pytest.approx(10.0, rel=1e-4)


def test_plan_and_schedule():
    specs = plan([64, 128], ["vq", "simvq"], [0.1, 1.0, 10.0], 64)
    assert len(specs) == len(set(specs)) == 4 + 2 * 2 * 3 - 2  # the scale-1 data-init runs are shared
    assert specs[:2] == [RunSpec("vq", 64), RunSpec("simvq", 64)]
    assert RunSpec("vq", 64, 0.1, False).name == "vq-K64-x0.1-noinit"
    both = plan([64], ["vq", "simvq"], [10.0], 64, (False,), (False, True))
    assert [s.name for s in both] == [
        "vq-K64-x1-datainit",
        "simvq-K64-x1-datainit",
        "vq-K64-x1-datainit-whiten",
        "simvq-K64-x1-datainit-whiten",
        "vq-K64-x10-noinit",
        "simvq-K64-x10-noinit",
    ]
    assert "model.whiten_codes=true" in both[2].overrides() and "model.whiten_codes=false" in both[0].overrides()
    assert eval_schedule(10, 4) == [0, 2, 5, 8, 10]
    assert eval_schedule(3, 3) == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("collapse-corpus")
    seed = 0
    for split, speakers in (("train", ("a", "b")), ("dev", ("c",))):
        for spk in speakers:
            (root / split / spk).mkdir(parents=True)
            for i in range(2):
                seed += 1
                sf.write(root / split / spk / f"{i}.wav", speechlike(1.2, seed=seed), 16000)
    return root


def study_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--out",
        str(out),
        "--size",
        "tiny",
        "--ks",
        "64,128",
        "--init-k",
        "64",
        "--init-scales",
        "10",
        "--steps",
        "2",
        "--evals",
        "2",
        "--batch-size",
        "2",
        "--segment-seconds",
        "0.2",
        "--train",
        str(corpus / "train"),
        "--dev",
        str(corpus / "dev"),
        "--dev-minutes",
        "0",
        "--mel-clips",
        "1",
        "--whitening",
        "off",
        *extra,
    ]


def test_a_tiny_study_writes_the_table_json_and_plots_and_resumes(corpus, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(study_args(corpus, out, "--keep-checkpoints")) == 0
    names = [
        "vq-K64-x1-datainit",
        "simvq-K64-x1-datainit",
        "vq-K128-x1-datainit",
        "simvq-K128-x1-datainit",
        "vq-K64-x10-datainit",
        "vq-K64-x10-noinit",
        "simvq-K64-x10-datainit",
        "simvq-K64-x10-noinit",
    ]
    data = json.loads((out / "collapse.json").read_text())
    runs = {r["name"]: r for r in data["runs"]}
    assert sorted(runs) == sorted(names)
    dev_frames = 2 * (1.2 * 16000 // 320)
    for run in runs.values():
        assert [r["step"] for r in run["curve"]] == [0, 1, 2]
        for r in run["curve"]:
            assert r["frames"] == dev_frames
            assert 1 <= r["used"] <= run["codebook_size"]
            assert r["utilisation"] == pytest.approx(r["used"] / run["codebook_size"])
            assert 1.0 <= r["perplexity"] <= r["used"] + 1e-9
            assert 1.0 <= r["latent_rank"] <= 16.0 and r["mel"] > 0
    # Same seed, same K: step 0 (before any update or data init) differs only by the scale factor.
    x1, x10 = runs["vq-K64-x1-datainit"]["curve"][0], runs["vq-K64-x10-noinit"]["curve"][0]
    assert x10["codebook_rms"] / x1["codebook_rms"] == pytest.approx(10.0, rel=1e-4)

    with open(out / "collapse.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["name"] for r in rows) == sorted(names)
    row = next(r for r in rows if r["name"] == "simvq-K128-x1-datainit")
    last = runs["simvq-K128-x1-datainit"]["curve"][-1]
    assert float(row["utilisation"]) == pytest.approx(last["utilisation"], abs=1e-6)
    assert float(row["ceiling"]) == pytest.approx(uniform_coverage(dev_frames, 128), abs=1e-6)
    md = (out / "collapse.md").read_text()
    assert md.count("| simvq | 128 |") == 1 and md.count("| vq | 10 | no | 64 |") == 1
    for png in ("utilisation_vs_step.png", "init_scale.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| quantizer | K | used |" in capsys.readouterr().out

    # Lose the last measurement and the summary of one run: the rerun resumes from its checkpoint at step 2
    # and measures the same figures again; the other runs are read back.
    run_dir = out / RUNS / "simvq-K64-x1-datainit"
    (run_dir / SUMMARY).unlink()
    lines = (run_dir / "collapse_metrics.jsonl").read_text().splitlines()
    (run_dir / "collapse_metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    assert main(study_args(corpus, out)) == 0
    again = {r["name"]: r for r in json.loads((out / "collapse.json").read_text())["runs"]}
    before, after = runs["simvq-K64-x1-datainit"]["curve"][-1], again["simvq-K64-x1-datainit"]["curve"][-1]
    assert {k: v for k, v in after.items() if not k.endswith("seconds")} == pytest.approx(
        {k: v for k, v in before.items() if not k.endswith("seconds")}
    )
    assert not (run_dir / "checkpoints").exists()  # removed once the run is finished (no --keep-checkpoints)

    assert main(study_args(corpus, out, "--lr", "0.01")) == 2
    assert "other settings" in capsys.readouterr().err


def test_bad_options_are_one_line_errors(corpus, tmp_path, capsys):
    assert main(study_args(corpus, tmp_path / "a", "--ks", "100")) == 2
    assert "powers of two" in capsys.readouterr().err
    assert main(study_args(corpus, tmp_path / "b", "model.codebook_size=8")) == 2
    assert "set by the experiment" in capsys.readouterr().err
    assert main(study_args(corpus, tmp_path / "c", "optim.nope=1")) == 2
    assert "unknown config key" in capsys.readouterr().err
    assert main(study_args(corpus, tmp_path / "d", "--whitening", "maybe")) == 2
    assert "--whitening takes off and/or on" in capsys.readouterr().err


def test_a_whitened_run_is_trained_whitened_and_reported_beside_the_plain_one(corpus, tmp_path):
    out = tmp_path / "study"
    assert (
        main(study_args(corpus, out, "--ks", "64", "--whitening", "off,on", "--no-init-study", "--keep-checkpoints"))
        == 0
    )
    ckpt = torch.load(
        next((out / RUNS / "simvq-K64-x1-datainit-whiten" / "checkpoints").glob("step_*.pt")), weights_only=False
    )
    whitened = [k for k in ckpt["model"] if "whitener" in k]
    assert whitened and not [
        k
        for k in torch.load(
            next((out / RUNS / "simvq-K64-x1-datainit" / "checkpoints").glob("step_*.pt")), weights_only=False
        )["model"]
        if "whitener" in k
    ]
    md = (out / "collapse.md").read_text()
    assert md.count("| simvq + whitening | 64 |") == 1 and md.count("| simvq | 64 |") == 1
