"""`simvq-codec eval-compare`: paired per-file differences of two evaluations, read from real results.csv files."""

import math

import pytest

from codec.errors import CodecError
from eval.compare import compare, read_results, run
from eval.report import write_csv
from eval.run import EvalResult, Row, _mean_row


def _row(file, setting, pesq, stoi, mel=0.3, kind=None):
    return Row(
        file=file,
        kind=kind,
        codec="simvq-16k",
        setting=setting,
        seconds=1.0,
        nominal_kbps=6.0,
        kbps=6.1,
        payload_kbps=6.0,
        pesq_wb=pesq,
        pesq_nb=math.nan,
        stoi=stoi,
        estoi=0.5,
        si_sdr=1.0,
        mel_distance=mel,
        delay_ms=0.0,
        encode_x_realtime=100.0,
        decode_x_realtime=80.0,
    )


def _write(path, rows):
    write_csv(EvalResult(rows, [_mean_row(rows)]), path)
    return path


@pytest.fixture
def pair(tmp_path):
    # The candidate gains 0.1 PESQ-WB on every file but one (a clear gain), and STOI moves by noise.
    base = [_row(f"f{i}", "12st", 1.5 + 0.1 * i, 0.80 + 0.01 * (i % 3)) for i in range(8)]
    cand = [
        _row(f"f{i}", "12st", 1.6 + 0.1 * i - (0.05 if i == 3 else 0), 0.80 + 0.01 * ((i + 1) % 3)) for i in range(8)
    ]
    cand.append(_row("only-in-candidate", "12st", 4.0, 1.0))
    (tmp_path / "base").mkdir()
    return _write(tmp_path / "base" / "results.csv", base), _write(tmp_path / "cand.csv", cand)


def test_paired_difference_and_verdicts(pair):
    base_path, cand_path = pair
    base = read_results(base_path.parent)  # a folder finds its results.csv
    assert set(base) == {("simvq-16k", "12st")} and len(base["simvq-16k", "12st"]) == 8  # no MEAN row
    by_metric = {c.metric: c for c in compare(base, read_results(cand_path), ["pesq_wb", "stoi"])}
    pesq = by_metric["pesq_wb"]
    assert pesq.files == 8  # the file only the candidate scored is not paired
    assert pesq.diff == pytest.approx((8 * 0.1 - 0.05) / 8)
    diffs = [0.1] * 7 + [0.05]
    mean = sum(diffs) / 8
    assert pesq.stderr == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in diffs) / 7 / 8))
    assert pesq.verdict == "better"
    assert by_metric["stoi"].diff == pytest.approx(0.02 / 8) and by_metric["stoi"].verdict == "level"


def test_lower_is_better_and_worse(tmp_path):
    base = [_row(f"f{i}", "2st", 1.5, 0.8, mel=0.30 + 0.01 * i) for i in range(5)]
    cand = [_row(f"f{i}", "2st", 1.4 + 0.001 * i, 0.8, mel=0.35 + 0.01 * i) for i in range(5)]
    got = {
        c.metric: c.verdict
        for c in compare(
            read_results(_write(tmp_path / "b.csv", base)),
            read_results(_write(tmp_path / "c.csv", cand)),
            ["pesq_wb", "mel_distance", "pesq_nb"],
        )
    }
    assert got == {"pesq_wb": "worse", "mel_distance": "worse"}  # pesq_nb undefined everywhere: no line


def test_cli_errors_and_table(pair, tmp_path, capsys):
    import argparse

    base_path, cand_path = pair
    assert run(argparse.Namespace(baseline=base_path, candidate=cand_path, metrics=["pesq_wb"], by=None)) == 0
    out = capsys.readouterr().out
    assert "| simvq-16k | 12st | pesq_wb | 8 |" in out and "better" in out
    assert run(argparse.Namespace(baseline=base_path, candidate=cand_path, metrics=["loudness"], by=None)) == 2
    assert "unknown metric loudness" in capsys.readouterr().err
    other = _write(tmp_path / "other.csv", [_row("f0", "1st", 1.0, 0.5)])
    assert run(argparse.Namespace(baseline=base_path, candidate=other, metrics=["pesq_wb"], by=None)) == 2
    assert "no codec setting scored" in capsys.readouterr().err
    with pytest.raises(CodecError, match="not found"):
        read_results(tmp_path / "missing")


def test_by_kind_compares_within_each_kind(pair, tmp_path, capsys):
    import argparse

    # Read speech gains 0.2 PESQ-WB on every file; acted speech loses 0.1 on every file; the files of the
    # pair fixture have no kind at all.
    base = [_row(f"f{i}", "12st", 1.5 + 0.1 * i, 0.8, kind="read" if i < 4 else "acted") for i in range(8)]
    cand = [_row(f"f{i}", "12st", 1.5 + 0.1 * i + (0.2 if i < 4 else -0.1), 0.8) for i in range(8)]
    base_path, cand_path = _write(tmp_path / "b.csv", base), _write(tmp_path / "c.csv", cand)
    got = compare(read_results(base_path), read_results(cand_path), ["pesq_wb"], by_kind=True)
    assert [(c.kind, c.files, round(c.diff, 6), c.verdict) for c in got] == [
        ("acted", 4, -0.1, "worse"),  # kinds in order, from the baseline's rows
        ("read", 4, 0.2, "better"),
    ]
    assert compare(read_results(base_path), read_results(cand_path), ["pesq_wb"])[0].verdict == "level"  # together
    assert run(argparse.Namespace(baseline=base_path, candidate=cand_path, metrics=["pesq_wb"], by="kind")) == 0
    out = capsys.readouterr().out
    assert "| codec | setting | kind | metric |" in out and "| simvq-16k | 12st | read | pesq_wb | 4 |" in out
    no_kind = argparse.Namespace(baseline=pair[0], candidate=pair[1], metrics=["pesq_wb"], by="kind")
    assert run(no_kind) == 2
    assert "no file has a kind" in capsys.readouterr().err
