"""ONNX export of the streaming codec: onnxruntime, through the reference runner, gives PyTorch's codes on the
reference recording (every frame, every stage) and its decoded audio within a stated tolerance, streaming frame
by frame; the state contract describes the graphs; the CLI writes them."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from codec import cli, load_model
from codec.onnx_export import export_onnx
from codec.pretrained import Pretrained
from eval.metrics import mel_distance
from tests.conftest import EXAMPLES, example_speech, speechlike, tiny_codec

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

RUNNER = EXAMPLES / "onnx_runner.py"
MAX_MEL_DISTANCE = 0.01
"""Largest mel distance (`eval.metrics.mel_distance`) allowed between the ONNX and the PyTorch decode: a
sixteenth of what the codec itself costs at 12 stages (0.16 on the reference). The arithmetic differs in
the last bits (other matrix kernels, the inverse STFT as a matrix product), and the pitch head makes
discrete choices (the f0 bin, voiced or not) that such a difference can flip where two options are nearly
equal. A flip re-phases that voiced stretch and, where the re-phasing hears what was played
(`rephase_iters`), the phases after it: the same sound, not the same samples. Measured on the
reference with the bundled model (re-phasing that hears what was played): 0.0001 at 12 stages, 0.0005 at 3, 0.0004
at 1."""
MIN_SNR_DB = 20.0
"""And the PyTorch decode's power over the difference's, which catches a misaligned or rescaled output that
the mel distance would not (measured: 56, 40 and 28 dB at 12, 3 and 1 stages)."""


def _load_runner():
    spec = importlib.util.spec_from_file_location("onnx_runner", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = _load_runner()


@pytest.fixture(scope="module")
def pretrained():
    return load_model(warn=False)


@pytest.fixture(scope="module")
def exported(pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(pretrained, out)
    return out


@pytest.fixture(scope="module")
def codec(exported):
    return runner.Codec(exported)


@pytest.fixture(scope="module")
def reference():
    return example_speech("reference.wav")


@pytest.fixture(scope="module")
def torch_codes(pretrained, reference):
    """PyTorch's codes of the reference, streamed one frame at a time: `[n_stages, frames]`."""
    model, hop = pretrained.model, pretrained.model.hop_length
    x = torch.from_numpy(reference)[None, None]
    stream = model.stream()
    codes = [stream.encode(x[..., t : t + hop]) for t in range(0, x.shape[-1], hop)] + [stream.flush_encoder()]
    return torch.cat(codes, dim=-1)[0].numpy()


def _torch_decode(model, codes: np.ndarray) -> np.ndarray:
    stream, c = model.stream(), torch.from_numpy(codes)[None]
    out = [stream.decode(c[..., t : t + 1]) for t in range(c.shape[-1])] + [stream.flush_decoder()]
    return torch.cat(out, dim=-1)[0, 0].numpy()


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert mel_distance(want, got) <= MAX_MEL_DISTANCE, mel_distance(want, got)
    snr = 10 * np.log10(np.sum(want**2) / max(np.sum((got - want) ** 2), 1e-30))
    assert snr >= MIN_SNR_DB, snr


def test_streamed_codes_are_pytorchs_on_every_frame_and_stage(codec, torch_codes, pretrained, reference):
    codes, num_samples = runner.compress(codec, EXAMPLES / "reference.wav")
    frames = -(-len(reference) // pretrained.model.hop_length)
    assert num_samples == len(reference) and codes.shape == torch_codes.shape == (12, frames)
    np.testing.assert_array_equal(codes, torch_codes)
    # and PyTorch's streamed codes are its offline ones
    np.testing.assert_array_equal(torch_codes, pretrained.model.encode(torch.from_numpy(reference)[None, None])[0])


@pytest.mark.parametrize("stages", [12, 3, 1])
def test_streamed_decode_matches_pytorch_within_tolerance(codec, torch_codes, pretrained, reference, stages):
    want = _torch_decode(pretrained.model, torch_codes[:stages])
    got = runner.decompress(codec, torch_codes[:stages])
    assert len(got) == len(want) == torch_codes.shape[1] * pretrained.model.hop_length
    _assert_close(got, want)
    assert len(runner.decompress(codec, torch_codes[:stages], len(reference))) == len(reference)


def test_one_step_over_the_whole_utterance_is_the_offline_codec(codec, torch_codes, pretrained, reference):
    """The same graphs with a dynamic frame axis: one call from the initial state is an offline pass."""
    hop, delay = pretrained.model.hop_length, codec.decoder_delay
    audio = np.pad(reference, (0, -len(reference) % hop))[None]
    np.testing.assert_array_equal(codec.encoder().step(audio)[0], torch_codes)
    decoder = codec.decoder()
    if codec.contract["decoder"]["inputs"]["codes"]["shape"][2] == 1:  # its re-phasing hears what was played
        with pytest.raises(Exception, match="frames|dimension|shape"):
            decoder.step(torch_codes[None])
        return
    out = decoder.step(torch_codes[None])
    got = np.concatenate([out[:, delay:], decoder.state["synthesis.tail"]], axis=1)[0]
    _assert_close(got, pretrained.model.decode(torch.from_numpy(torch_codes)[None])[0, 0].numpy())


def test_a_batch_of_streams_is_each_stream_alone(codec, torch_codes):
    frames = torch_codes[:, :20]
    batch = np.stack([frames, frames[:, ::-1]])
    decoder = codec.decoder(batch=2)
    both = np.concatenate([decoder.decode(batch), decoder.flush()], axis=1)
    for item, codes in zip(both, batch):
        alone = codec.decoder()
        _assert_close(item, np.concatenate([alone.decode(codes[None]), alone.flush()], axis=1)[0])


@pytest.mark.parametrize(
    "variant",
    [
        dict(phase="absolute"),
        dict(phase="propagated"),
        dict(phase="propagated", rephase_iters=2),
        dict(advance_features=True),
        dict(codebook_size=[128, 64, 64, 64]),
    ],
)
def test_the_other_models_export_too(tmp_path, variant):
    """Absolute phases, propagated phases without a pitch head (the bundled model has one), re-phasing from
    what was played (one frame per decoder call), and an encoder that sees phase advances."""
    model = tiny_codec(seed=1, **variant)
    info = export_onnx(Pretrained(model, "tiny", "0" * 64, False), tmp_path)
    frames = 1 if variant.get("rephase_iters") else "frames"
    assert info["decoder"]["inputs"]["codes"]["shape"][2] == frames
    onnx_codec, wav = runner.Codec(tmp_path), speechlike(0.5)
    stream, x = model.stream(), torch.from_numpy(wav)[None, None]
    want = torch.cat([stream.encode(x[..., t : t + 320]) for t in range(0, x.shape[-1], 320)], dim=-1)[0].numpy()
    np.testing.assert_array_equal(onnx_codec.encoder().encode(wav[None])[0], want)
    _assert_close(runner.decompress(onnx_codec, want), _torch_decode(model, want))
    assert onnx_codec.contract["codebook_sizes"] == list(model.codebook_sizes)
    too_large = want[None, :1, :1] * 0 + model.codebook_sizes[0]  # one code past stage 1's last
    with pytest.raises(runner.RunnerError, match="for each stage's size K"):
        onnx_codec.decoder().decode(too_large)


def test_the_contract_describes_the_graphs(exported, pretrained):
    import onnx

    info = json.loads((exported / "codec.json").read_text())
    model = pretrained.model
    assert (info["model_id"], info["sha256"]) == (pretrained.model_id, pretrained.sha256)
    assert (
        info["sample_rate"],
        info["hop_length"],
        info["n_stages"],
        info["codebook_sizes"],
        info["decoder_delay"],
    ) == (16000, 320, 12, list(model.codebook_sizes), model.decoder_delay)
    initial = model.init_streaming_state(1).tensors()
    graph_state = []
    for part, main_in, main_out in (("encoder", "audio", "codes"), ("decoder", "codes", "audio")):
        graph = onnx.load(str(exported / info[part]["file"]), load_external_data=False).graph
        state = info[part]["state"]
        assert [i.name for i in graph.input] == [main_in] + [s["name"] for s in state]
        assert [o.name for o in graph.output] == [main_out] + [s["output"] for s in state]
        for s, value in zip(state, graph.input[1:]):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert dims == s["shape"] == ["batch", *initial[s["name"]].shape[1:]]
            assert s["dtype"] == str(initial[s["name"]].dtype).removeprefix("torch.") and s["initial"] == 0.0
        graph_state += [s["name"] for s in state]
    # every state tensor of the PyTorch stream is in a graph, but the two that the caller keeps
    assert sorted(graph_state + ["samples", "synthesis.skip"]) == sorted(initial)


def test_cli_writes_the_graphs_and_refuses_to_overwrite(tmp_path, capsys):
    assert cli.main(["export-onnx", str(tmp_path / "out")]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"encoder.onnx", "decoder.onnx", "codec.json"}
    assert "encoder.onnx" in capsys.readouterr().err
    assert cli.main(["export-onnx", str(tmp_path / "out")]) == cli.EXIT_USAGE
    assert "--force" in capsys.readouterr().err


def test_runner_command_line_round_trip_without_torch(exported, tmp_path):
    npz, out = tmp_path / "ref.npz", tmp_path / "ref.wav"
    # the runner's main() in a fresh interpreter, which must not have imported torch by the end
    script = (
        f"import runpy, sys; rc = runpy.run_path({str(RUNNER)!r})['main'](sys.argv[1:]); "
        "assert 'torch' not in sys.modules; sys.exit(rc)"
    )
    for args in (
        ["compress", str(exported), str(EXAMPLES / "reference.wav"), str(npz)],
        ["decompress", str(exported), str(npz), str(out), "--stages", "2"],
    ):
        r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    data = np.load(npz)
    info = json.loads((exported / "codec.json").read_text())
    assert data["codes"].shape[0] == 12 and str(data["sha256"]) == info["sha256"]
    assert sf.info(out).frames == int(data["num_samples"]) == len(example_speech("reference.wav"))


def test_cli_export_on_a_full_disk_leaves_nothing_and_a_rerun_needs_no_force(tmp_path):
    import resource

    from codec.checkpoint import save_model

    save_model(tiny_codec(), tmp_path / "tiny", model_id="tiny", trained=False)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "codec.cli",
        "--threads",
        "1",
        "export-onnx",
        str(out),
        "--model",
        str(tmp_path / "tiny"),
    ]

    def small_files():  # files past 4 KB cannot be written (EFBIG), as on a full disk (ENOSPC)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    r = subprocess.run(command, capture_output=True, text=True, preexec_fn=small_files)
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == f"simvq-codec: error: cannot write {out}: file too large"
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    assert subprocess.run(command, capture_output=True).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = subprocess.run([*command, "--force"], capture_output=True, text=True, preexec_fn=small_files)
    assert r.returncode == 2 and {p.name: p.read_bytes() for p in out.iterdir()} == before  # as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny"]


def test_the_runner_refuses_what_the_cli_refuses_with_the_same_message(tmp_path, capsys):
    from codec.checkpoint import save_model

    model_dir, onnx_dir = tmp_path / "tiny", tmp_path / "onnx"
    save_model(tiny_codec(), model_dir, model_id="tiny", trained=False)
    assert cli.main(["export-onnx", str(onnx_dir), "--model", str(model_dir)]) == 0
    nan = np.zeros(16000, np.float32)
    nan[100] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    (tmp_path / "cut.wav").write_bytes((EXAMPLES / "speech.wav").read_bytes()[:150_000])
    (tmp_path / "text.wav").write_text("not audio")
    sf.write(tmp_path / "ok.wav", speechlike(0.3), 16000)
    capsys.readouterr()

    def last_line(code: int) -> str:
        assert code == 2
        return capsys.readouterr().err.strip().splitlines()[-1].split(": error: ", 1)[1]

    out = str(tmp_path / "out.x")
    cases = [([name], []) for name in ("nan.wav", "empty.wav", "cut.wav", "text.wav", "missing.wav")]
    cases += [(["ok.wav"], ["--stages", n]) for n in ("0", "5", "-1", "-12")]
    for names, options in cases:
        src = str(tmp_path / names[0])
        want = last_line(cli.main(["compress", src, out, "--model", str(model_dir), *options]))
        assert last_line(runner.main(["compress", str(onnx_dir), src, out, *options])) == want, (names, options)
        assert last_line(runner.main(["roundtrip", str(onnx_dir), src, out, *options])) == want, (names, options)
    nowhere = str(tmp_path / "no" / "out.wav")
    want = last_line(cli.main(["compress", str(tmp_path / "ok.wav"), nowhere, "--model", str(model_dir)]))
    assert last_line(runner.main(["roundtrip", str(onnx_dir), str(tmp_path / "ok.wav"), nowhere])) == want
    assert not (tmp_path / "out.x").exists()
    npz = str(tmp_path / "ok.npz")
    assert runner.main(["compress", str(onnx_dir), str(tmp_path / "ok.wav"), npz]) == 0
    capsys.readouterr()
    assert last_line(runner.main(["decompress", str(onnx_dir), npz, out, "--stages", "13"])) == (
        "stages must be between 1 and 4, got 13"
    )
    for tok in sorted(str(p) for p in (EXAMPLES.parent / "tests" / "golden").glob("*.tok")):  # versions 1 and 2
        assert last_line(runner.main(["decompress", str(onnx_dir), tok, out])).startswith(
            f"{tok} is a .tok file: decode it with `simvq-codec decompress`"
        )
    assert last_line(runner.main(["decompress", str(onnx_dir), str(tmp_path / "ok.wav"), out])) == (
        f"{tmp_path / 'ok.wav'} is not a .npz file written by this runner's compress"
    )
