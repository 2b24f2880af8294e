"""`simvq-codec tokenize`: Parquet shards equal to `compress` tokens, an error table, resuming, 1 vs 2 local
workers, manifests, long files, padded batches, and Ray Data on a local Ray instance."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

pq = pytest.importorskip("pyarrow.parquet")

from codec.batching import encode_padded  # noqa: E402
from codec.api import compress  # noqa: E402
from codec.checkpoint import load_pretrained  # noqa: E402
from codec.errors import CodecError  # noqa: E402
from codec.tokfile import read_tok  # noqa: E402
from tests.support import make_tiny_model, speech_like  # noqa: E402
from training import tokenize as tk  # noqa: E402

# (relative path, seconds, rate, channels); lengths are not whole frames, so padding would show
CLIPS = [
    ("19/198/19_198_000001.wav", 0.413, 16000, 1),
    ("19/198/19_198_000002.wav", 1.3071, 16000, 1),
    ("19/201/19_201_000003.flac", 0.917, 44100, 2),
    ("p225/p225_001.wav", 0.733, 16000, 1),
    ("p225/p225_002.ogg", 1.1013, 22050, 1),
    ("p225/p225_003.wav", 2.5017, 16000, 1),
    ("misc/a.wav", 0.05, 8000, 1),
]
BROKEN = "p225/p225_bad.wav"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    model_dir = root / "model"
    make_tiny_model(model_dir, model_id="tiny-tok")
    audio = root / "audio"
    for i, (rel, seconds, rate, channels) in enumerate(CLIPS):
        path = audio / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, speech_like(seconds, rate, seed=i, channels=channels), rate)
    (audio / BROKEN).write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt this is not audio")
    return {"root": root, "audio": audio, "model": str(model_dir)}


def _rows(out: Path) -> dict[str, dict]:
    rows = {}
    for shard in sorted(out.glob("shard-*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            rows[row["path"]] = row
    return rows


def _reference(path: Path, model) -> np.ndarray:
    """What `simvq-codec compress` writes for the file."""
    buf = io.BytesIO()
    compress(str(path), buf, model=model)
    buf.seek(0)
    return read_tok(buf)[1]


def test_local_shards_hold_the_compress_tokens_and_an_error_table(corpus, tmp_path):
    out = tmp_path / "out"
    result = tk.tokenize(corpus["audio"], out, model=corpus["model"], workers=1, shard_size=3)
    assert (result.files, result.encoded, result.failed) == (len(CLIPS) + 1, len(CLIPS), 1)
    assert (result.shards, result.shards_written, result.shards_skipped) == (3, 3, 0)
    assert result.audio_seconds == pytest.approx(sum(c[1] for c in CLIPS), abs=1e-3)
    assert sorted(p.name for p in out.glob("shard-*.parquet")) == [f"shard-{i:05d}.parquet" for i in range(3)]

    model = load_pretrained(corpus["model"])
    rows = _rows(out)
    assert sorted(rows) == sorted(c[0] for c in CLIPS)
    for rel, seconds, rate, _ in CLIPS:
        row = rows[rel]
        codes = np.array(row["codes"])
        assert codes.shape == (4, row["num_frames"])
        assert codes.tolist() == _reference(corpus["audio"] / rel, model).tolist()
        assert row["duration"] == pytest.approx(int(seconds * rate) / rate)
    assert rows["19/198/19_198_000001.wav"]["speaker"] == "19"
    assert rows["p225/p225_001.wav"]["speaker"] == "p225"
    assert rows["misc/a.wav"]["speaker"] == "misc"

    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert [e["path"] for e in errors] == [BROKEN]
    assert "cannot read" in errors[0]["reason"] or "not" in errors[0]["reason"]
    assert result.errors == [(BROKEN, errors[0]["reason"])]

    meta = json.loads(pq.read_schema(out / "shard-00000.parquet").metadata[b"simvq"])
    index = json.loads((out / "index.json").read_text())
    assert meta["model_id"] == index["model_id"] == "tiny-tok"
    assert meta["weights_sha256"] == model.sha256
    assert (meta["n_stages"], meta["codebook_size"], meta["frame_rate"]) == (4, 64, 50.0)
    assert meta["codebook_sizes"] == index["codebook_sizes"] == [64] * 4
    assert index["files"] == len(CLIPS) + 1 and index["shards"] == 3


def test_rerun_skips_written_shards_and_redoes_missing_ones(corpus, tmp_path):
    out = tmp_path / "out"
    tk.tokenize(corpus["audio"], out, model=corpus["model"], shard_size=3)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")}
    again = tk.tokenize(corpus["audio"], out, model=corpus["model"], shard_size=3)
    assert (again.shards_written, again.shards_skipped, again.encoded) == (0, 3, 0)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")} == stamps
    assert len(again.errors) == 1  # the error table still lists the failure from the first run

    before = pq.read_table(out / "shard-00001.parquet")
    (out / "shard-00001.parquet").unlink()
    redo = tk.tokenize(corpus["audio"], out, model=corpus["model"], shard_size=3)
    assert (redo.shards_written, redo.shards_skipped) == (1, 2)
    assert pq.read_table(out / "shard-00001.parquet").equals(before)

    with pytest.raises(CodecError, match="n_stages"):
        tk.tokenize(corpus["audio"], out, model=corpus["model"], shard_size=3, n_stages=2)
    forced = tk.tokenize(corpus["audio"], out, model=corpus["model"], shard_size=3, n_stages=2, force=True)
    assert forced.shards_written == 3
    assert all(len(r["codes"]) == 2 for r in _rows(out).values())


def test_two_local_workers_write_the_same_shards(corpus, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    tk.tokenize(corpus["audio"], one, model=corpus["model"], workers=1, shard_size=4)
    result = tk.tokenize(corpus["audio"], two, model=corpus["model"], workers=2, shard_size=4)
    assert (result.encoded, result.failed) == (len(CLIPS), 1)
    for shard in sorted(one.glob("shard-*.parquet")):
        assert pq.read_table(two / shard.name).equals(pq.read_table(shard))
    assert pq.read_table(two / "errors.parquet").equals(pq.read_table(one / "errors.parquet"))


def test_manifests_csv_and_plain_list(corpus, tmp_path):
    audio = corpus["audio"]
    csv_path = audio / "list.csv"
    csv_path.write_text(
        "path,speaker,duration\n19/198/19_198_000002.wav,alice,1.3\n"
        f"{audio / 'p225/p225_001.wav'},bob,0.7\nmissing.wav,carol,1\n"
    )
    result = tk.tokenize(csv_path, tmp_path / "csv", model=corpus["model"])
    assert (result.encoded, result.failed) == (2, 1)
    rows = _rows(tmp_path / "csv")
    assert rows["19/198/19_198_000002.wav"]["speaker"] == "alice"
    assert rows[str(audio / "p225/p225_001.wav")]["speaker"] == "bob"
    assert result.errors[0][0] == "missing.wav"

    listing = audio / "list.txt"
    listing.write_text("# one path per line\np225/p225_003.wav\n19/201/19_201_000003.flac\n")
    assert tk.tokenize(listing, tmp_path / "txt", model=corpus["model"]).encoded == 2
    rows = pq.read_table(tmp_path / "txt" / "shard-00000.parquet").to_pylist()
    assert [(r["path"], r["speaker"]) for r in rows] == [
        ("p225/p225_003.wav", "p225"),
        ("19/201/19_201_000003.flac", "19"),
    ]
    csv_path.unlink()
    listing.unlink()


def test_long_files_stream_to_the_same_tokens(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(tk, "LONG_CLIP_SECONDS", 1.0)  # 1.3 s and 2.5 s clips take the streaming path
    tk.tokenize(corpus["audio"], tmp_path / "long", model=corpus["model"])
    model = load_pretrained(corpus["model"])
    for rel in ("19/198/19_198_000002.wav", "p225/p225_003.wav"):
        got = np.array(_rows(tmp_path / "long")[rel]["codes"])
        assert got.tolist() == _reference(corpus["audio"] / rel, model).tolist()


def test_padded_batches_equal_lone_encodes(tmp_path):
    model = make_tiny_model(tmp_path / "m", encoder_dim=64, encoder_layers=2, latent_dim=16, codebook_size=256).model
    lengths = [0.413, 0.917, 1.3071, 0.05, 0.2345, 0.6789, 1.0101, 0.333]  # none a whole number of frames
    clips = [torch.from_numpy(speech_like(s, seed=i)) for i, s in enumerate(lengths)]
    batched = encode_padded(model, clips, 3)
    for clip, codes in zip(clips, batched):
        alone = model.encode(clip[None, None], 3)[0]
        assert codes.shape == alone.shape == (3, -(-len(clip) // 320))
        assert torch.equal(codes, alone)


def test_plan_batches_keeps_padded_seconds_within_budget():
    seconds = [5.0, 1.0, 2.0, 2.5, 9.0, 0.5, 4.0]
    batches = tk.plan_batches(seconds, 8.0)
    assert sorted(i for b in batches for i in b) == list(range(len(seconds)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(seconds[i] for i in b) <= 8.0
    assert [9.0] in [[seconds[i] for i in b] for b in batches]  # longer than the budget: alone
    assert len(batches) < len(seconds)


def test_cli_summary_and_errors(corpus, tmp_path, capsys):
    from codec.cli import main

    out = tmp_path / "cli"
    code = main(
        [
            "tokenize",
            str(corpus["audio"]),
            "--out",
            str(out),
            "--model",
            corpus["model"],
            "--bitrate",
            "0.6",
            "--shard-size",
            "100",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert f"{len(CLIPS)} files encoded, 1 failed" in err and "audio hours per hour" in err
    assert all(len(r["codes"]) == 2 for r in _rows(out).values())  # 0.6 kbit/s = 2 stages of 6-bit codes at 50 Hz
    assert main(["tokenize", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "no folder or manifest" in capsys.readouterr().err


def test_code_use_counts_every_frame_of_every_stage(corpus, tmp_path, capsys):
    from codec.cli import main

    out = tmp_path / "use"
    assert main(["tokenize", str(corpus["audio"]), "--out", str(out), "--model", corpus["model"], "--stages", "3"]) == 0
    codes = [np.asarray(r["codes"], dtype=np.int64) for r in _rows(out).values()]  # [3, F] each
    frames, use = tk.code_use(out)
    assert frames == sum(c.shape[1] for c in codes) and len(use) == 3
    for s, u in enumerate(use):
        counts = np.bincount(np.concatenate([c[s] for c in codes]), minlength=u.size)
        p = counts[counts > 0] / frames
        assert u.used == (counts > 0).sum() and u.entropy_bits == pytest.approx(-(p * np.log2(p)).sum())
        assert 0 < u.entropy_bits <= np.log2(u.size)
    err = capsys.readouterr().err
    assert f"codebook use over {frames} frames" in err and f"stage  1: {use[0].used} / {use[0].size}" in err


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_data_writes_the_same_shards(corpus, tmp_path, local_ray):
    local, remote = tmp_path / "local", tmp_path / "ray"
    tk.tokenize(corpus["audio"], local, model=corpus["model"], shard_size=3)
    result = tk.tokenize(
        corpus["audio"], remote, model=corpus["model"], shard_size=3, use_ray=True, workers=2, device="auto"
    )
    assert (result.encoded, result.failed, result.shards_written) == (len(CLIPS), 1, 3)
    assert local_ray.is_initialized()  # a Ray it did not start is left running
    for shard in sorted(local.glob("shard-*.parquet")):
        assert pq.read_table(remote / shard.name).equals(pq.read_table(shard))
    assert pq.read_table(remote / "errors.parquet").to_pylist() == pq.read_table(local / "errors.parquet").to_pylist()
    (remote / "shard-00002.parquet").unlink()
    again = tk.tokenize(corpus["audio"], remote, model=corpus["model"], shard_size=3, use_ray=True, workers=1)
    assert (again.shards_written, again.shards_skipped) == (1, 2)
