"""The model side of eval/ (real .tok bytes, codebook use) and the report files, with a tiny random model."""

import csv
import json
import math

import numpy as np
import pytest
import soundfile as sf

from codec.errors import CodecError
from codec.stages import StageError
from eval.dataset import list_inputs
from eval.model import count_codes, model_settings, stage_usage
from eval.peers import Codec2
from eval.report import markdown, write_report
from eval.run import MEAN, evaluate
from tests.conftest import example_speech


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import torch

    from codec.checkpoint import save_model
    from codec.model import SimVQCodec

    torch.manual_seed(0)
    model = SimVQCodec(
        encoder_dim=16,
        encoder_layers=1,
        decoder_dim=16,
        decoder_layers=1,
        latent_dim=8,
        n_stages=3,
        codebook_size=16,
        code_dim=8,
        whiten_codes=True,
        principal_maps=False,
        pitch_prior=False,
        rephase_iters=0,
    )  # fast: no phase extras
    return str(save_model(model, tmp_path_factory.mktemp("tiny"), model_id="tiny-test", trained=False))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    sf.write(root / "a.wav", example_speech()[:40000], 16000)  # 2.5 s
    sf.write(root / "b.flac", example_speech("reference.wav")[:24000], 16000)  # 1.5 s
    (root / "notes.txt").write_text("not audio")
    return root


def test_stage_usage_math():
    usage = stage_usage(np.array([[5, 5, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]))
    assert [(u.used, u.utilisation) for u in usage] == [(2, 0.5), (4, 1.0), (0, 0.0)]
    assert usage[0].perplexity == pytest.approx(2.0) and usage[1].perplexity == pytest.approx(4.0)
    assert math.isnan(usage[2].perplexity)
    counts = count_codes(np.array([[0, 0, 3], [1, 2, 2]]), (4, 4))
    assert [c.tolist() for c in counts] == [[2, 0, 0, 1], [0, 1, 2, 0]]
    counts = count_codes(np.array([[0, 7, 7], [1, 2, 2]]), (8, 4))  # stages of different sizes
    assert [c.tolist() for c in counts] == [[1, 0, 0, 0, 0, 0, 0, 2], [0, 1, 2, 0]]
    assert [(u.used, u.codebook_size, u.utilisation) for u in stage_usage(counts)] == [(2, 8, 0.25), (2, 4, 0.5)]


def test_model_settings_from_stages_and_bitrates(tiny_model_dir):
    assert [s.n_stages for s in model_settings(tiny_model_dir)] == [1, 2, 3]  # defaults that fit
    assert [s.n_stages for s in model_settings(tiny_model_dir, bitrates=[0.45, 0.5, 6])] == [2, 3]
    assert model_settings(tiny_model_dir, stages=[2])[0].nominal_kbps == pytest.approx(0.4)
    with pytest.raises(CodecError, match="between 1 and 3"):
        model_settings(tiny_model_dir, stages=[4])
    with pytest.raises(StageError, match="not both"):  # the stage rule of codec.stages, one error type
        model_settings(tiny_model_dir, stages=[2], bitrates=[0.5])


def test_model_rows_use_real_tok_bytes(tiny_model_dir, folder, tmp_path):
    from codec.api import compress, encode_array
    from eval.model import get_model

    items = list_inputs([folder])
    assert [it.key for it in items] == ["a.wav", "b.flac"]
    settings = model_settings(tiny_model_dir, stages=[1, 3])
    result = evaluate(items, settings, jobs=1, progress=False)
    assert len(result.rows) == 4 and len(result.averages) == 2
    for row in result.rows:
        tok = tmp_path / f"{row.file}.{row.setting}.tok"
        compress(folder / row.file, tok, model=get_model(tiny_model_dir), n_stages=int(row.setting[:-2]))
        assert row.kbps == pytest.approx(tok.stat().st_size * 8 / row.seconds / 1000)
        assert row.payload_kbps < row.kbps
        assert row.encode_x_realtime > 0 and row.decode_x_realtime > 0
    mean = result.averages[1]
    assert (mean.file, mean.setting, mean.files, mean.seconds) == (MEAN, "3st", 2, pytest.approx(4.0))
    assert mean.payload_kbps == pytest.approx(0.6, abs=0.01)  # 3 stages x 4 bits x 50 frames/s
    # Utilisation over the whole set equals the distinct codes of both files together.
    model = get_model(tiny_model_dir)
    codes = [encode_array(sf.read(it.path, dtype="float32")[0], 16000, model, n_stages=3)[1] for it in items]
    both = np.concatenate(codes, axis=1)
    usage = result.usage["tiny-test 3st"]
    assert [u.used for u in usage] == [len(np.unique(stage)) for stage in both]


def test_report_files(tiny_model_dir, folder, tmp_path):
    import shutil

    codecs = model_settings(tiny_model_dir, stages=[3])
    if shutil.which("c2enc") and shutil.which("c2dec"):
        codecs.append(Codec2("3200"))
    result = evaluate(list_inputs([folder]), codecs, jobs=1, progress=False)
    paths = write_report(result, tmp_path)
    names = {p.name for p in paths}
    assert {
        "results.json",
        "results.csv",
        "report.md",
        "pesq_wb_vs_kbps.png",
        "stoi_vs_kbps.png",
        "stage_utilisation.png",
    } <= names
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["rows"]) == 2 * len(codecs) and len(data["averages"]) == len(codecs)
    assert data["rows"][0]["file"] == "a.wav" and data["rows"][0]["codec"] == "tiny-test"
    assert len(data["codebook_usage"]["tiny-test 3st"]) == 3
    with open(tmp_path / "results.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 3 * len(codecs)
    assert [r["file"] for r in lines].count(MEAN) == len(codecs)
    report = (tmp_path / "report.md").read_text()
    assert "| codec | setting | kbps | payload kbps | PESQ-WB | STOI | ESTOI | SI-SDR dB | mel dist |" in report
    assert "| tiny-test | 3st | " in report
    assert "## Codebook use over the set: tiny-test 3st" in report
    assert "By kind" not in report and data["by_kind"] == {} and "kind" not in lines[0]  # no manifest kinds
    if len(codecs) == 2:
        row = next(r for r in data["averages"] if r["codec"] == "codec2")
        assert f"| codec2 | 3200 | {row['kbps']:.2f} | " in report
        assert row["stoi"] > 0.6


def test_process_pool_gives_the_same_rows_in_file_order(folder):
    import shutil

    if not (shutil.which("c2enc") and shutil.which("c2dec")):
        pytest.skip("codec2 not installed")
    items = list_inputs([folder])
    serial = evaluate(items, [Codec2("3200")], jobs=1, progress=False)
    pooled = evaluate(items, [Codec2("3200")], jobs=2, progress=False)
    assert pooled.config["jobs"] == 2
    assert [r.file for r in pooled.rows] == ["a.wav", "b.flac"]
    for a, b in zip(serial.rows, pooled.rows):
        assert (a.kbps, a.pesq_wb, a.stoi, a.delay_ms) == (b.kbps, b.pesq_wb, b.stoi, b.delay_ms)


def test_means_by_kind_of_speech(tiny_model_dir, tmp_path, capsys):
    from eval.cli import main

    speech, other = example_speech(), example_speech("reference.wav")
    clips = {"r1.wav": speech[:32000], "r2.wav": other[:24000], "a1.wav": speech[40000:56000], "a2.wav": other[:3200]}
    for name, wav in clips.items():
        sf.write(tmp_path / name, wav, 16000)
    manifest = tmp_path / "m.csv"  # a2 (0.2 s) is too short for PESQ and STOI: the means must leave it out
    manifest.write_text("path,speaker,kind\nr1.wav,s1,read\nr2.wav,s2,read\na1.wav,s1,acted\na2.wav,s2,acted\n")
    out = tmp_path / "out"
    argv = [str(manifest), "--out", str(out), "--model", tiny_model_dir, "--stages", "1,3", "--no-peers"]
    assert main([*argv, "--jobs", "1", "--no-plots"]) == 0
    with open(out / "results.csv") as f:
        lines = [r for r in csv.DictReader(f) if r["file"] != MEAN]
    kinds = {"r1.wav": "read", "r2.wav": "read", "a1.wav": "acted", "a2.wav": "acted"}
    assert len(lines) == 8 and all(r["kind"] == kinds[r["file"]] for r in lines)
    assert all(r["pesq_wb"] == r["stoi"] == "" for r in lines if r["file"] == "a2.wav")
    data = json.loads((out / "results.json").read_text())
    report, stdout = (out / "report.md").read_text(), capsys.readouterr().out
    assert "## By kind of speech" in report
    header = "| codec | setting | acted (2 files) | read (2 files) |"
    assert header in report and header in stdout  # the summary printed is the report
    for setting in ("1st", "3st"):
        cells = []
        for kind in ("acted", "read"):
            mine = [r for r in lines if r["setting"] == setting and r["kind"] == kind]
            pesq = np.mean([float(r["pesq_wb"]) for r in mine if r["pesq_wb"]])
            stoi = np.mean([float(r["stoi"]) for r in mine if r["stoi"]])
            got = data["by_kind"][f"tiny-test {setting}"][kind]
            assert got == {"pesq_wb": pytest.approx(pesq, abs=1e-4), "stoi": pytest.approx(stoi, abs=1e-4), "files": 2}
            cells.append(f"{got['pesq_wb']:.2f} / {got['stoi']:.3f}")
        assert f"| tiny-test | {setting} | {' | '.join(cells)} |" in report
    # Files without a kind beside files with one: a column of their own, last.
    result = evaluate(
        list_inputs([manifest, tmp_path / "r1.wav"]), model_settings(tiny_model_dir, stages=[1]), jobs=1, progress=False
    )
    assert [(r.kind, r.files) for r in result.by_kind] == [("acted", 2), ("read", 2), (None, 1)]
    assert "| codec | setting | acted (2 files) | read (2 files) | (no kind) (1 file) |" in markdown(result)
