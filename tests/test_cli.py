"""The command line, run as users run it: round trips, pipes, and clean failures."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from codec import cli
from tests.conftest import speechlike

EXAMPLE = Path(__file__).parents[1] / "examples" / "speech.wav"


def run(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "codec.cli", "--threads", "1", *args], input=stdin, capture_output=True
    )


@pytest.fixture
def wav_44k_stereo(tmp_path):
    mono = speechlike(1.3, 44100)
    path = tmp_path / "in.flac"
    sf.write(path, np.stack([mono, 0.5 * mono], axis=1), 44100)
    return path


def test_round_trip_restores_exact_length_and_info(tmp_path, wav_44k_stereo):
    tok, out = tmp_path / "a.tok", tmp_path / "a.wav"
    r = run("compress", str(wav_44k_stereo), str(tok), "--bitrate", "3")
    assert r.returncode == 0, r.stderr
    assert b"converted to mono 16000 Hz" in r.stderr
    r = run("decompress", str(tok), str(out))
    assert r.returncode == 0, r.stderr
    expected = round(1.3 * 16000)
    assert abs(sf.info(out).frames - expected) <= 1 and sf.info(out).samplerate == 16000
    r = run("info", str(tok))
    text = r.stdout.decode()
    assert r.returncode == 0 and "5 stages: 14+14+10+10+10 bits" in text and "2.900 kbit/s" in text  # 3 kbit/s
    assert "simvq-16k" in text


@pytest.mark.skipif(not EXAMPLE.exists(), reason="example recording not present")
def test_example_recording_round_trips_exactly(tmp_path):
    tok, out = tmp_path / "s.tok", tmp_path / "s.flac"
    assert run("compress", str(EXAMPLE), str(tok)).returncode == 0
    assert run("decompress", str(tok), str(out)).returncode == 0
    assert sf.info(out).frames == sf.info(EXAMPLE).frames and sf.info(out).format == "FLAC"


def test_pipes_stream_through(tmp_path):
    audio = speechlike(0.9)
    src = tmp_path / "in.wav"
    sf.write(src, audio, 16000, subtype="PCM_16")
    tok = run("compress", "-", "-", stdin=src.read_bytes())
    assert tok.returncode == 0, tok.stderr
    wav = run("decompress", "-", "-", stdin=tok.stdout)
    assert wav.returncode == 0, wav.stderr
    assert wav.stdout[:4] == b"RIFF"
    (tmp_path / "out.wav").write_bytes(wav.stdout)
    assert sf.info(tmp_path / "out.wav").frames == len(audio)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is not audio", b"cannot read"),
        (None, b"no such file"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, content, message):
    src, dst = tmp_path / "bad.wav", tmp_path / "out.tok"
    if content is not None:
        src.write_bytes(content)
    r = run("compress", str(src), str(dst))
    assert r.returncode == 2 and message in r.stderr and b"Traceback" not in r.stderr
    assert not dst.exists() and list(tmp_path.glob(".*part")) == []


def test_nan_and_empty_audio_are_rejected(tmp_path):
    nan = np.zeros(1600, np.float32)
    nan[100] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    for name, message in (("nan.wav", b"non-finite"), ("empty.wav", b"no audio")):
        r = run("compress", str(tmp_path / name), str(tmp_path / "x.tok"))
        assert r.returncode == 2 and message in r.stderr and b"Traceback" not in r.stderr


def test_corrupt_token_file_fails_cleanly(tmp_path, wav_44k_stereo):
    tok = tmp_path / "a.tok"
    assert run("compress", str(wav_44k_stereo), str(tok)).returncode == 0
    data = tok.read_bytes()
    (tmp_path / "cut.tok").write_bytes(data[: len(data) // 2])
    r = run("decompress", str(tmp_path / "cut.tok"), str(tmp_path / "out.wav"))
    assert r.returncode == 2 and b"Traceback" not in r.stderr and not (tmp_path / "out.wav").exists()


def test_no_overwrite_without_force(tmp_path, wav_44k_stereo):
    tok = tmp_path / "a.tok"
    tok.write_bytes(b"keep me")
    r = run("compress", str(wav_44k_stereo), str(tok))
    assert r.returncode == 2 and b"--force" in r.stderr and tok.read_bytes() == b"keep me"
    assert run("compress", str(wav_44k_stereo), str(tok), "--force").returncode == 0
    assert tok.read_bytes()[:4] != b"keep"


def test_bitrate_below_lowest_is_an_error(tmp_path, wav_44k_stereo):
    r = run("compress", str(wav_44k_stereo), str(tmp_path / "a.tok"), "--bitrate", "0.2")
    assert r.returncode == 2 and b"lowest bitrate" in r.stderr


def test_help_explains_commands():
    text = cli.build_parser(plugins=False).format_help()
    for word in ("compress", "decompress", "info", "examples"):
        assert word in text


def test_truncated_wav_exits_2_with_the_same_line_from_a_file_and_a_pipe(tmp_path):
    half = tmp_path / "half.wav"
    half.write_bytes(EXAMPLE.read_bytes()[:150_000])  # `head -c 150000`: the header says 165,842 frames
    r = run("compress", str(half), str(tmp_path / "a.tok"))
    line = r.stderr.decode().strip()
    assert r.returncode == 2 and line == (
        f"simvq-codec: error: {half} is truncated: its header declares 165842 "
        "frames (10.37 s) but it holds 74978 (4.69 s)"
    )
    assert not (tmp_path / "a.tok").exists()
    piped = run("compress", "-", "-", stdin=half.read_bytes())
    assert piped.returncode == 2 and piped.stderr.decode().strip() == line.replace(str(half), "stdin")


def test_a_pipe_gets_no_output_from_input_that_fails_in_its_first_block(tmp_path):
    nan = np.zeros(16000, np.float32)
    nan[8000] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    r = run("compress", "-", "-", stdin=(tmp_path / "nan.wav").read_bytes())
    assert r.returncode == 2 and b"stdin has a non-finite sample" in r.stderr and r.stdout == b""
    sf.write(tmp_path / "ok.wav", speechlike(0.9), 16000, subtype="PCM_16")
    tok = run("compress", "-", "-", stdin=(tmp_path / "ok.wav").read_bytes()).stdout
    for cut in (tok[:-3], tok[:60]):  # a truncated .tok, with and without whole frames
        for fmt in ("wav", "flac"):
            r = run("decompress", "-", "-", "--format", fmt, stdin=cut)
            assert r.returncode == 2 and b"truncated token file" in r.stderr and r.stdout == b"", (len(cut), fmt)


def test_help_says_what_a_pipe_can_leave_behind():
    parser = cli.build_parser(plugins=False)
    for command in ("compress", "decompress"):
        text = " ".join(parser._subparsers._group_actions[0].choices[command].format_help().split())
        assert "first 10 s" in text and "exit status" in text, text


@pytest.mark.parametrize("model_id", ["{dir}", "../{name}", "simvq-16k"])
def test_a_token_file_finds_its_model_by_weights_never_by_a_name_or_folder(tmp_path, model_id):
    import io

    from codec.checkpoint import read_config, save_model
    from codec.tokfile import read_tok, write_tok
    from tests.conftest import tiny_codec

    folder = tmp_path / "planted"
    model_id = model_id.format(dir=folder, name=folder.name)
    sha = read_config(save_model(tiny_codec(), folder, model_id=model_id, trained=False))["sha256"]
    src, tok = tmp_path / "in.wav", tmp_path / "a.tok"
    sf.write(src, speechlike(0.5), 16000)
    assert run("compress", str(src), str(tok), "--model", str(folder)).returncode == 0
    header, codes = read_tok(tok)
    assert header.version == 2 and header.model_id is None and tok.read_bytes()[4:8] == header.weights_hash
    old = tmp_path / "old.tok"  # a version-1 file carries the id, which decoding does not use
    write_tok(
        old,
        dataclasses.replace(
            header, model_id=model_id, sample_rate=16000, version=1, weights_hash=bytes.fromhex(sha[:16])
        ),
        codes,
    )
    for path in (tok, old):
        out = path.with_suffix(".wav")
        r = run("decompress", str(path), str(out))
        assert r.returncode == 2 and not out.exists() and b"Traceback" not in r.stderr
        line = r.stderr.decode()
        assert f"the file was made with weights {sha[: 8 if path == tok else 16]}" in line
        assert "which this installation does not have" in line and "--model" in line and "simvq-16k (weights" in line
        assert ("in the file" in line) == (path == old)
        info = run("info", str(path)).stdout.decode()
        assert "installed here: no" in info and f"version {2 if path == tok else 1}" in info
        assert run("decompress", str(path), str(out), "--model", str(folder)).returncode == 0  # a choice
        assert sf.info(out).frames == 8000
    assert read_tok(io.BytesIO(old.read_bytes()))[0].model_id == model_id


def test_bitrate_nan_is_refused_as_not_a_rate(tmp_path, wav_44k_stereo):
    r = run("compress", str(wav_44k_stereo), str(tmp_path / "a.tok"), "--bitrate", "nan")
    assert r.returncode == 2 and r.stderr.decode().strip() == (
        "simvq-codec: error: the bitrate must be a number of kbit/s above 0, got nan"
    )
    assert "inf included) means all stages" in " ".join(
        cli.build_parser(plugins=False)._subparsers._group_actions[0].choices["compress"].format_help().split()
    )


def _run_to(stdout, *args, stdin=None, **kwargs):
    """`run`, with standard output going to the open file `stdout` (a redirect such as `> out.wav`)."""
    return subprocess.run(
        [sys.executable, "-m", "codec.cli", "--threads", "1", *args],
        input=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def _one_error_line(r) -> str:
    lines = r.stderr.decode().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and b"Traceback" not in r.stderr, r.stderr.decode()
    return lines[0]


def test_a_redirected_stdout_is_cut_back_when_the_command_fails(tmp_path):
    """`cat truncated.wav | compress - - | decompress - - > out.wav`: after the first 10 s block the output has
    started, and the failure must leave the redirected file as it was, not a short well-formed WAV or FLAC."""
    whole = tmp_path / "whole.wav"
    sf.write(whole, np.tile(speechlike(1.0), 30), 16000, subtype="PCM_16")  # header: 30 s
    cut = whole.read_bytes()[: 44 + 21 * 16000 * 2]  # holds 21 s
    partial_tok = run("compress", "-", "-", stdin=cut)
    assert partial_tok.returncode == 2 and len(partial_tok.stdout) > 1000  # two 10 s blocks went out
    for fmt in ("wav", "flac"):
        out = tmp_path / f"out.{fmt}"
        with open(out, "wb") as f:
            r = _run_to(f, "decompress", "-", "-", "--format", fmt, stdin=partial_tok.stdout)
        assert b"truncated token file" in r.stderr and _one_error_line(r)
        assert out.read_bytes() == b"", fmt
    with open(tmp_path / "out.tok", "wb") as f:
        assert _run_to(f, "compress", "-", "-", stdin=cut).returncode == 2
    assert (tmp_path / "out.tok").read_bytes() == b""
    log = tmp_path / "log.txt"  # appending: what was there before stays, nothing is added
    log.write_bytes(b"kept\n")
    with open(log, "ab") as f:
        assert _run_to(f, "decompress", "-", "-", stdin=partial_tok.stdout).returncode == 2
    assert log.read_bytes() == b"kept\n"
    with open(tmp_path / "ok.wav", "wb") as f:  # and a command that succeeds writes it whole
        ok_tok = run("compress", str(EXAMPLE), "-").stdout
        assert _run_to(f, "decompress", "-", "-", stdin=ok_tok).returncode == 0
    assert sf.info(tmp_path / "ok.wav").frames == sf.info(EXAMPLE).frames


def test_output_that_cannot_be_written_is_one_line_and_exit_2(tmp_path):
    src, tok = tmp_path / "in.wav", tmp_path / "in.tok"
    sf.write(src, speechlike(0.5), 16000)
    assert run("compress", str(src), str(tok)).returncode == 0
    folder = tmp_path / "folder"
    folder.mkdir()
    for force in ((), ("--force",)):
        line = _one_error_line(run("compress", str(src), str(folder), *force))
        assert line == f"simvq-codec: error: cannot write {folder}: it is a directory"
    line = _one_error_line(run("decompress", str(tok), "/proc/x.wav"))
    assert line == "simvq-codec: error: cannot write /proc/x.wav: no such file or directory"
    with open("/dev/full", "wb") as full:
        for args in (
            ("compress", str(src), "-"),
            ("decompress", str(tok), "-"),
            ("decompress", str(tok), "-", "--format", "flac"),
            ("info", str(tok)),
        ):
            line = _one_error_line(_run_to(full, *args))
            assert line == "simvq-codec: error: cannot write stdout: no space left on device", args
    import resource

    def small_files():  # a disk that fills up after 2 KB: writes past it fail (EFBIG) as they would (ENOSPC)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    sf.write(tmp_path / "long.wav", speechlike(12.0), 16000)
    for args, out in (
        (("compress", str(tmp_path / "long.wav")), tmp_path / "long.tok"),
        (("decompress", str(tok)), tmp_path / "out.wav"),
        (("decompress", str(tok)), tmp_path / "out.flac"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "codec.cli", "--threads", "1", *args, str(out)],
            capture_output=True,
            preexec_fn=small_files,
        )
        assert _one_error_line(r) == f"simvq-codec: error: cannot write {out}: file too large"
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "in.tok", "in.wav", "long.wav"]


def test_a_read_only_file_system_is_one_line(tmp_path, monkeypatch, capsys):
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / ".x.part"))

    src = tmp_path / "in.wav"
    sf.write(src, speechlike(0.3), 16000)
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert cli.main(["compress", str(src), str(tmp_path / "a.tok")]) == 2
    assert capsys.readouterr().err == f"simvq-codec: error: cannot write {tmp_path / 'a.tok'}: read-only file system\n"


def test_sigterm_removes_the_temporary_file_as_ctrl_c_does(tmp_path):
    import signal
    import time

    out = tmp_path / "a.tok"
    p = subprocess.Popen(
        [sys.executable, "-m", "codec.cli", "--threads", "1", "compress", "-", str(out)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    sf.write(tmp_path / "in.wav", speechlike(30.0), 16000, subtype="PCM_16")
    p.stdin.write((tmp_path / "in.wav").read_bytes()[:100_000])  # then wait, the pipe open
    p.stdin.flush()
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".a.tok.*.part")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".a.tok.*.part")), "the temporary file never appeared"
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 128 + signal.SIGTERM
    p.stdin.close()
    assert b"Traceback" not in p.stderr.read()
    p.stderr.close()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["in.wav"]


def test_threads_must_be_a_positive_count(capsys):
    for value in ("-1", "0", "x"):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["--threads", value, "models"])
        assert exit_.value.code == 2
        assert f"argument --threads: must be a whole number of at least 1, got '{value}'" in capsys.readouterr().err


def test_binary_files_where_text_is_expected_and_nan_sizes_are_one_line(tmp_path, capsys):
    wav, folder = tmp_path / "three.wav", tmp_path / "corpus"
    sf.write(wav, speechlike(0.5), 16000)
    folder.mkdir()
    manifest = f"{wav} is an audio file, not a manifest: pass a folder of audio files or a manifest"
    for argv, message in (
        (["bundle", str(wav), str(tmp_path / "b")], manifest),
        (["tokenize", str(wav), "--out", str(tmp_path / "t")], manifest),
        (
            ["bundle", str(folder), str(tmp_path / "b"), "--config", str(wav)],
            f"config {wav} is not a YAML file (it is not UTF-8 text)",
        ),
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"simvq-codec: error: {message}") and err.count("\n") == 1, err
    for option in ("--max-mb", "--kbps"):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["bundle", str(folder), str(tmp_path / "b"), option, "nan"])
        assert exit_.value.code == 2
        assert f"argument {option}: must be a finite number above 0, got 'nan'" in capsys.readouterr().err


def test_an_empty_token_file_decodes_to_an_empty_wav_and_flac_refuses_it(tmp_path):
    from codec import load_model
    from codec.tokfile import write_tok

    release = load_model(warn=False)
    tok = tmp_path / "empty.tok"
    write_tok(tok, release.header(release.model.n_stages, 0), np.zeros((release.model.n_stages, 0), np.int64))
    assert run("decompress", str(tok), str(tmp_path / "e.wav")).returncode == 0
    assert sf.info(tmp_path / "e.wav").frames == 0
    for out in (str(tmp_path / "e.flac"), "-"):
        r = run("decompress", str(tok), out, "--format", "flac")
        assert (
            _one_error_line(r)
            == (
                "simvq-codec: error: the audio is empty (0 samples) and FLAC cannot hold an "
                "empty stream: write WAV instead"
            )
            and r.stdout == b""
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.wav", "empty.tok"]


def test_a_token_file_of_other_weights_names_the_installed_model_and_a_tiny_file_has_no_rate(tmp_path):
    import dataclasses

    from codec import load_model
    from codec.presets import list_models
    from codec.tokfile import write_tok

    release = load_model(warn=False)
    foreign = dataclasses.replace(release.header(1, 1), weights_hash=bytes(8))
    write_tok(tmp_path / "foreign.tok", foreign, np.zeros((1, 1), np.int64))
    line = _one_error_line(run("decompress", str(tmp_path / "foreign.tok"), str(tmp_path / "out.wav")))
    installed = ", ".join(f"{m} (weights {load_model(m, warn=False).sha256[:8]})" for m in list_models())
    assert line == (
        "simvq-codec: error: the file was made with weights 00000000, which this installation does not "
        f"have (installed: {installed}); pass --model ID|DIR to decode it with a model you choose"
    )
    write_tok(tmp_path / "one.tok", release.header(1, 1), np.zeros((1, 1), np.int64))  # a 1-sample file
    info = run("info", str(tmp_path / "one.tok")).stdout.decode()
    rows = {line[:16].strip(): line[17:] for line in info.splitlines()}
    assert (
        rows["file bitrate"] == f"{(tmp_path / 'one.tok').stat().st_size} bytes (no rate for under 1 s of audio: "
        "the header is most of the file)"
    )
