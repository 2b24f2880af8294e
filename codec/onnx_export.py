"""ONNX export of the streaming codec: an encoder graph and a decoder graph whose state is explicit.

Each graph is one streaming step over any whole number of frames T (T = 1 for frame-by-frame streaming; the
whole utterance with the initial state for offline use), except the decoder of a model whose re-phasing
re-phases what it plays (`rephase_iters`), which takes one frame per call (`codec.json` says 1):

    encoder.onnx   audio [B, T*hop] float32, state...  ->  codes [B, n_stages, T] int64, next state...
    decoder.onnx   codes [B, S, T] int64 (1 <= S <= n_stages), state...  ->  audio [B, T*hop] float32, next state...

A state input is named as in `StreamingState.tensors()` ("encoder.0.dwconv.history"); the graph returns its
new value as "next.<name>", which the caller feeds back at the next step. `codec.json`, written beside the
graphs, lists every state tensor's name, shape, dtype and initial value with the model's identity (see
`contract`). Two parts of the PyTorch streaming state stay with the caller instead of the graphs:

- the encoder's buffer of a partial frame (`samples`): a step takes whole frames only, so it is always empty;
  at the end of a stream the caller zero-pads the last partial frame, as `flush_encoder()` does;
- the decoder's count of samples still to drop (`synthesis.skip`): the graph returns T*hop samples per
  step, and the first `decoder_delay` samples of a stream lie before its start (PyTorch drops them from its
  first call); at the end of a stream the state `synthesis.tail` is what `flush_decoder()` returns.

The graphs are traced from the model's own modules: the convolutions, the quantizer search, the pitch head
and the whole synthesis (phase propagation, re-phasing, overlap-add) run the model's code. Where ONNX has no
operator (complex tensors, FFTs), that code runs in its traceable form: the STFT as a product with a
constant DFT matrix (`codec.features.matrix_stft`, in float64 as `STFTFeatures` computes it) and the
synthesis's spectra as real tensors (`codec.synthesis.TraceableSpectra`).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codec.errors import CodecError, OutputError
from codec.features import dft_matrix, hops_per_window, matrix_stft
from codec.model import SimVQCodec, half_state
from codec.output import output_error
from codec.pretrained import Pretrained
from codec.streaming import StreamingState
from codec.synthesis import TraceableSpectra

FORMAT = "simvq-codec-onnx/1"
OPSET = 17
ENCODER_FILE, DECODER_FILE, CONTRACT_FILE = "encoder.onnx", "decoder.onnx", "codec.json"


class OnnxUnavailableError(CodecError):
    """The `onnx` package (the exporter's dependency) is not installed."""


def _bind(model: SimVQCodec, names: list[str], tensors: tuple[Tensor, ...]) -> StreamingState:
    """A streaming state of `model` whose fields `names` are `tensors` (the rest stay fresh)."""
    state = model.init_streaming_state(tensors[0].shape[0])
    for name, tensor in zip(names, tensors):
        layer, field = name.rsplit(".", 1)
        setattr(state.layers[layer], field, tensor)
    return state


class EncoderStep(nn.Module):
    """`(audio [B, T*hop], *state) -> (codes [B, n_stages, T], *next state)`: T whole frames through the
    encoder and the quantizer, from the state the previous step left."""

    def __init__(self, model: SimVQCodec):
        super().__init__()
        self.model = model
        self.state_names = half_state(model, "encode")  # "features.history" first, then the encoder's
        features = model.features
        self.hop, self.context = features.hop, features.context
        hops_per_window(features.n_fft, features.hop)  # refused here, before tracing starts
        self.register_buffer("basis", dft_matrix(features.window), persistent=False)

    def features(self, history: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
        """`STFTFeatures` streaming: (features [B, T, out_dim], the next history)."""
        x = torch.cat([history, audio], dim=-1)  # [B, context + T * frame]
        next_history = x[:, -self.context :]
        re, im = matrix_stft(x, self.basis, self.hop)
        feats = self.model.features.from_spectrum(re, im, torch.sqrt(re * re + im * im))
        return feats.to(audio.dtype), next_history

    def forward(self, audio: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        feats, next_history = self.features(state[0], audio)
        with model.streaming(_bind(model, self.state_names[1:], state[1:])) as streaming:
            latents = model.encoder_out(model.encoder(model.encoder_in(feats)))
        codes = model.quantizer.encode(latents)
        tensors = streaming.tensors()
        return (codes, next_history, *(tensors[n] for n in self.state_names[1:]))


class DecoderStep(nn.Module):
    """`(codes [B, S, T], *state) -> (audio [B, T*hop], *next state)`: T frames of codes through the decoder,
    the pitch head and the inverse STFT. Each step returns T*hop samples: the first `decoder_delay` samples
    of a stream lie before its start, and the last ones are the final state's `synthesis.tail`."""

    def __init__(self, model: SimVQCodec):
        super().__init__()
        self.model = model
        self.state_names = half_state(model, "decode")
        # Every stage's codes in the latent, one table: stage s, code c is row offset[s] + c.
        quantizer = model.quantizer
        offsets = [0, *itertools.accumulate(quantizer.codebook_sizes)][:-1]
        self.register_buffer("offsets", torch.tensor(offsets)[None, :, None], persistent=False)
        self.register_buffer("table", torch.cat([s.output_codebook() for s in quantizer.stages]), persistent=False)
        self.spectra = TraceableSpectra(model.synthesis)

    def latents(self, codes: Tensor) -> Tensor:
        """`ResidualQuantizer.decode` for any number of stages: one gather and a sum."""
        return F.embedding(codes + self.offsets[:, : codes.shape[1]], self.table).sum(1)  # [B, T, D]

    def synthesise(self, spectrum: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
        """`ISTFTSynthesis.forward` streaming, without `skip`: (audio [B, T*hop], the next tail)."""
        synthesis = self.model.synthesis
        log_mag, phase = synthesis.split(spectrum)
        out = synthesis.samples(synthesis.magnitudes(log_mag), phase, tail, self.spectra)
        return out[:, : -synthesis.delay], out[:, -synthesis.delay :]

    def forward(self, codes: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        given = dict(zip(self.state_names, state))
        # The overlap-add (and any re-phasing) is the wrapper's; the rest runs the model's code.
        tail = given.pop("synthesis.tail")
        with model.streaming(_bind(model, list(given), tuple(given.values()))) as streaming:
            spectrum, _ = model._decode(self.latents(codes))
            audio, next_tail = self.synthesise(spectrum, tail)
        tensors = {**streaming.tensors(), "synthesis.tail": next_tail}
        return (audio, *(tensors[n] for n in self.state_names))


def _played_model(model: SimVQCodec) -> bool:
    """Its synthesis runs one step after another (`rephase_iters`): its decoder graph is traced on, and takes,
    one frame per call."""
    return model.synthesis.rephase_iters > 0


def _initial(tensor: Tensor) -> float:
    values = tensor.unique()
    if values.numel() != 1:
        raise ValueError("a state tensor whose initial value is not one constant")
    return float(values.item())


def contract(pretrained: Pretrained, encoder: EncoderStep, decoder: DecoderStep) -> dict:
    """What a runner needs besides the graphs: the model's identity and layout, and every state tensor."""
    model = pretrained.model
    initial = model.init_streaming_state(1).tensors()
    frames, samples = (1, model.hop_length) if _played_model(model) else ("frames", "frames * hop_length")

    def state(names: list[str]) -> list[dict]:
        return [
            {
                "name": n,
                "output": f"next.{n}",
                "shape": ["batch", *initial[n].shape[1:]],
                "dtype": str(initial[n].dtype).removeprefix("torch."),
                "initial": _initial(initial[n]),
            }
            for n in names
        ]

    return {
        "format": FORMAT,
        "model_id": pretrained.model_id,
        "sha256": pretrained.sha256,
        "sample_rate": model.sample_rate,
        "hop_length": model.hop_length,
        "frame_rate": model.frame_rate,
        "n_stages": model.n_stages,
        "codebook_sizes": list(model.codebook_sizes),  # codes per stage, stage 1 first
        "decoder_delay": model.decoder_delay,
        "opset": OPSET,
        "encoder": {
            "file": ENCODER_FILE,
            "inputs": {"audio": {"shape": ["batch", "frames * hop_length"], "dtype": "float32"}},
            "outputs": {"codes": {"shape": ["batch", "n_stages", "frames"], "dtype": "int64"}},
            "state": state(encoder.state_names),
        },
        "decoder": {
            "file": DECODER_FILE,
            "inputs": {"codes": {"shape": ["batch", "stages (1 to n_stages)", frames], "dtype": "int64"}},
            "outputs": {"audio": {"shape": ["batch", samples], "dtype": "float32"}},
            "state": state(decoder.state_names),
        },
    }


def _export(step: nn.Module, main: tuple[str, Tensor, dict], main_out: tuple[str, dict], path: Path) -> None:
    """Trace `step` on its main input's example and the initial state; the main input's and output's axes
    as given, every state tensor's first axis dynamic (the batch)."""
    initial = step.model.init_streaming_state(1).tensors()
    state = tuple(initial[n] for n in step.state_names)
    (main, example, in_axes), (main_out, out_axes) = main, main_out
    names = [main, *step.state_names]
    outputs = [main_out, *(f"next.{n}" for n in step.state_names)]
    axes = {main: in_axes, main_out: out_axes}
    axes.update({n: {0: "batch"} for n in names[1:] + outputs[1:]})
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing notes the Python constants it bakes in (the delay, "is there a step"), which are constants.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step,
            (example, *state),
            str(path),
            input_names=names,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


def export_onnx(pretrained: Pretrained, out_dir: str | os.PathLike) -> dict:
    """Write `encoder.onnx`, `decoder.onnx` and `codec.json` (the state contract) for `pretrained` into
    `out_dir`; returns the contract. The files are written into a temporary folder beside it and moved in
    at the end, so a failure (a full disk) leaves `out_dir` as it was."""
    try:
        import onnx
    except ImportError:
        raise OnnxUnavailableError("ONNX export needs the onnx package: pip install 'simvq-codec[onnx]'") from None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"cannot write into {out}: it is not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part"))
    except OSError as exc:
        raise output_error(out, exc) from None
    try:
        info = _write_graphs(pretrained, tmp, onnx)
        tmp.chmod(0o755)  # mkdtemp's folder is private; an export is for all to read
        if not out.exists():
            os.rename(tmp, out)
        else:
            for name in (ENCODER_FILE, DECODER_FILE, CONTRACT_FILE):  # the contract last
                os.replace(tmp / name, out / name)
    except OSError as exc:
        raise output_error(out, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def _write_graphs(pretrained: Pretrained, out: Path, onnx) -> dict:
    """The two graphs and the contract, written into the folder `out`."""
    model = pretrained.model.eval()
    with torch.no_grad():
        model.quantizer.encode(torch.zeros(1, 1, model.quantizer.stages[0].dim))  # caches W(C) and the whiteners
        encoder, decoder = EncoderStep(model).eval(), DecoderStep(model).eval()
    audio = ("audio", torch.zeros(1, model.hop_length), {0: "batch", 1: "samples"})
    codes_axes, audio_axes = {0: "batch", 1: "stages", 2: "frames"}, {0: "batch", 1: "samples"}
    if _played_model(model):  # one frame per call (`ISTFTSynthesis._played`)
        codes_axes, audio_axes = {0: "batch", 1: "stages"}, {0: "batch"}
    codes = ("codes", torch.zeros(1, model.n_stages, 1, dtype=torch.long), codes_axes)
    _export(encoder, audio, ("codes", {0: "batch", 2: "frames"}), out / ENCODER_FILE)
    _export(decoder, codes, ("audio", audio_axes), out / DECODER_FILE)
    info = contract(pretrained, encoder, decoder)
    for name in (ENCODER_FILE, DECODER_FILE):
        graph = onnx.load(str(out / name))
        onnx.checker.check_model(graph)
        for key in ("model_id", "sha256"):
            graph.metadata_props.add(key=key, value=str(info[key]))
        onnx.save(graph, str(out / name))
    (out / CONTRACT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info
