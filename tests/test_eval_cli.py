"""`simvq-codec eval` / `python -m eval`: inputs (folders, manifests), outputs, errors and a bad PATH."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from codec.errors import AudioError
from codec.manifest import AudioItem
from eval.cli import register
from eval.dataset import list_inputs, load_audio, spread_per_speaker
from tests.conftest import example_speech

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    sf.write(root / "one.wav", example_speech("reference.wav")[:32000], 16000)
    sub = root / "sub"
    sub.mkdir()
    stereo = np.stack([example_speech()[100000:148000]] * 2, axis=1)  # 3 s of the second prompt
    sf.write(sub / "two.wav", stereo, 48000)  # read as stereo at 48 kHz: 1 s
    return root


def _parser():
    parser = argparse.ArgumentParser(prog="simvq-codec")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_folder_and_manifest_inputs(folder, tmp_path):
    assert [it.key for it in list_inputs([folder])] == ["one.wav", "sub/two.wav"]
    two = load_audio(folder / "sub" / "two.wav")
    assert two.dtype == np.float32 and two.shape == (16000,)  # mixed down and resampled to 16 kHz
    manifest = folder / "manifest.csv"
    manifest.write_text(
        "path,speaker,duration,split,source,language\n"
        "one.wav,s1,2.0,test,asterisk,en\nsub/two.wav,s2,1.0,train,asterisk,en\n"
    )
    items = list_inputs([manifest], split="test")
    assert [(it.key, it.speaker, it.path) for it in items] == [("one.wav", "s1", (folder / "one.wav").resolve())]
    assert len(list_inputs([manifest])) == 2 and len(list_inputs([folder], limit=1)) == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("path,split\nmissing.wav,test\n")
    with pytest.raises(AudioError, match="do not exist"):
        list_inputs([bad])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AudioError, match="no audio"):
        list_inputs([tmp_path / "empty"])
    # two manifests that list the same relative path: each file's key names its manifest
    other = tmp_path / "other"
    other.mkdir()
    sf.write(other / "one.wav", example_speech()[:16000], 16000)
    (other / "other.csv").write_text("path,split\none.wav,test\n")
    keys = [it.key for it in list_inputs([manifest, other / "other.csv"], split="test")]
    assert keys == ["manifest.csv/one.wav", "other.csv/one.wav"]
    with pytest.raises(AudioError, match="one.wav is given twice"):  # results pair files by these keys
        list_inputs([folder / "one.wav", other / "one.wav"])
    manifest.unlink()


def test_per_speaker_keeps_every_voice_evenly_spread():
    items = [
        AudioItem(Path(f"{spk}/{i}.wav"), spk, key=f"{spk}/{i}.wav")
        for spk, n in (("a", 10), ("b", 2))
        for i in range(n)
    ]
    picked = spread_per_speaker(items, 4)
    assert [it.key for it in picked] == ["a/0.wav", "a/2.wav", "a/5.wav", "a/7.wav", "b/0.wav", "b/1.wav"]
    # no speaker column: the folder
    folders = [AudioItem(Path(n), "guess", key=n, named_speaker=False) for n in ("x/1.wav", "x/2.wav", "y/1.wav")]
    assert [it.key for it in spread_per_speaker(folders, 1)] == ["x/1.wav", "y/1.wav"]


def test_subcommand_runs_and_refuses_to_overwrite(folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = _parser().parse_args(
        [
            "eval",
            str(folder),
            "--out",
            str(out),
            "--no-model",
            "--peers",
            "codec2",
            "--codec2-modes",
            "3200",
            "--jobs",
            "1",
            "--no-plots",
        ]
    )
    if os.system("which c2enc > /dev/null") != 0:
        pytest.skip("codec2 not installed")
    assert args.func(args) == 0
    stdout = capsys.readouterr().out
    assert "| codec2 | 3200 |" in stdout
    data = json.loads((out / "results.json").read_text())
    assert [r["file"] for r in data["rows"]] == ["one.wav", "sub/two.wav"]
    assert data["averages"][0]["files"] == 2
    assert args.func(args) == 2
    assert "--force" in capsys.readouterr().err


def test_bad_arguments(tmp_path, capsys):
    parser = _parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "x", "--out", "o", "--stages", "1,a"])
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "x", "--out", "o", "--stages", "1", "--bitrates", "3"])
    args = parser.parse_args(["eval", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--no-model"])
    assert args.func(args) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "x.wav").write_bytes(b"")
    args = parser.parse_args(["eval", str(tmp_path), "--out", str(tmp_path / "o"), "--peers", "mp3", "--no-model"])
    assert args.func(args) == 2
    assert "unknown peer" in capsys.readouterr().err


def test_python_m_eval_with_bad_path_skips_peers(folder, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PATH="/nonexistent")
    proc = subprocess.run(
        [sys.executable, "-m", "eval", str(folder), "--out", str(out), "--no-model", "--jobs", "2", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "skipped opus: opusenc, opusdec not found on PATH" in proc.stderr
    report = (out / "report.md").read_text()
    assert "## Skipped codecs" in report and "- codec2: c2enc, c2dec not found on PATH" in report
    assert json.loads((out / "results.json").read_text())["rows"] == []


def test_unquantized_row_scores_the_latent_without_tokens(folder, tmp_path, capsys):
    out = tmp_path / "out"
    args = _parser().parse_args(
        [
            "eval",
            str(folder),
            "--out",
            str(out),
            "--no-peers",
            "--stages",
            "1",
            "--unquantized",
            "--jobs",
            "1",
            "--no-plots",
            "--quiet",
        ]
    )
    assert args.func(args) == 0
    rows = {r["setting"]: r for r in json.loads((out / "results.json").read_text())["averages"]}
    assert set(rows) == {"1st", "unquantized"}
    assert rows["unquantized"]["kbps"] is None  # no bitrate: nothing is transmitted
    # one stage of codes loses much of the latent: decoding the latent itself scores closer to the input
    assert rows["unquantized"]["mel_distance"] < rows["1st"]["mel_distance"]
