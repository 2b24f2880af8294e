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

The graphs are traced from the model's own modules (the convolutions, the quantizer search, the pitch head
and the phase propagation run the model's code), with two substitutions that ONNX needs: the STFT and the
inverse STFT are real DFTs written as matrix products with a constant basis (float64 on the analysis side,
as `STFTFeatures` computes), and the overlap-add is a sum of shifted frames.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codec.errors import CodecError, OutputError
from codec.model import CALLER_STATE, SimVQCodec
from codec.output import output_error
from codec.synthesis import carried_phase
from codec.pretrained import Pretrained
from codec.streaming import StreamingState

FORMAT = "simvq-codec-onnx/1"
OPSET = 17
ENCODER_FILE, DECODER_FILE, CONTRACT_FILE = "encoder.onnx", "decoder.onnx", "codec.json"


class OnnxUnavailableError(CodecError):
    """The `onnx` package (the exporter's dependency) is not installed."""


def _state_names(model: SimVQCodec, prefixes: tuple[str, ...]) -> list[str]:
    names = model.init_streaming_state(1).tensors()
    return [n for n in names if n not in CALLER_STATE and n.startswith(prefixes)]


def _bind(model: SimVQCodec, names: list[str], tensors: tuple[Tensor, ...]) -> StreamingState:
    """A streaming state of `model` whose fields `names` are `tensors` (the rest stay fresh)."""
    state = model.init_streaming_state(tensors[0].shape[0])
    for name, tensor in zip(names, tensors):
        layer, field = name.rsplit(".", 1)
        setattr(state.layers[layer], field, tensor)
    return state


def _blocks(n_fft: int, hop: int) -> int:
    if n_fft % hop:
        raise ValueError(f"ONNX export needs n_fft ({n_fft}) to be a multiple of sub_hop ({hop})")
    return n_fft // hop


def _analysis_basis(window: Tensor) -> Tensor:
    """The real DFT of `causal_stft` with `window`, as one float64 matrix: [n_fft, 2 * bins] (cos, then -sin)."""
    n_fft = window.shape[-1]
    n = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    angle = 2 * math.pi * torch.outer(n, k) / n_fft
    return torch.cat([torch.cos(angle), -torch.sin(angle)], dim=1) * window.double()[:, None]


class EncoderStep(nn.Module):
    """`(audio [B, T*hop], *state) -> (codes [B, n_stages, T], *next state)`: T whole frames through the
    encoder and the quantizer, from the state the previous step left."""

    def __init__(self, model: SimVQCodec):
        super().__init__()
        self.model = model
        self.state_names = ["features.history", *_state_names(model, ("encoder.",))]
        features = model.features
        self.n_fft, self.hop, self.context = features.n_fft, features.hop, features.context
        self.blocks = _blocks(self.n_fft, self.hop)
        self.register_buffer("basis", _analysis_basis(features.window), persistent=False)

    def features(self, history: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
        """`STFTFeatures` streaming: (features [B, T, out_dim], the next history)."""
        x = torch.cat([history, audio], dim=-1)  # [B, context + T * frame]
        next_history = x[:, -self.context :]
        blocks = x.double().reshape(x.shape[0], -1, self.hop)  # [B, context / hop + N, hop]
        last = self.blocks - 1
        frames = torch.cat([blocks[:, i : (i - last) or None] for i in range(self.blocks)], dim=-1)  # [B, N, n_fft]
        re, im = (frames @ self.basis).chunk(2, dim=-1)
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
        self.state_names = _state_names(model, ("decoder.", "synthesis."))
        synthesis = model.synthesis
        self.n_fft, self.hop, self.bins = synthesis.n_fft, synthesis.hop, synthesis.bins
        self.blocks = _blocks(self.n_fft, self.hop)
        # Every stage's codes in the latent, one table: stage s, code c is row offset[s] + c.
        quantizer = model.quantizer
        offsets = [0, *itertools.accumulate(quantizer.codebook_sizes)][:-1]
        self.register_buffer("offsets", torch.tensor(offsets)[None, :, None], persistent=False)
        self.register_buffer("table", torch.cat([s.output_codebook() for s in quantizer.stages]), persistent=False)
        # `irfft(spec, n_fft)` of a half spectrum as matrices [bins, n_fft] for its real and imaginary parts
        # (the imaginary parts of DC and Nyquist do not count, as in irfft).
        n = torch.arange(self.n_fft, dtype=torch.float64)
        k = torch.arange(self.bins, dtype=torch.float64)
        angle = 2 * math.pi * torch.outer(k, n) / self.n_fft
        weight = torch.full((self.bins, 1), 2.0, dtype=torch.float64)
        weight[0] = weight[-1] = 1.0
        cos, sin = torch.cos(angle) * weight / self.n_fft, -torch.sin(angle) * weight / self.n_fft
        sin[0] = sin[-1] = 0.0
        self.register_buffer("cos_basis", cos.float(), persistent=False)
        self.register_buffer("sin_basis", sin.float(), persistent=False)
        if synthesis.rephase_iters:
            self.register_buffer("analysis", _analysis_basis(synthesis.analysis_window).float(), persistent=False)

    def latents(self, codes: Tensor) -> Tensor:
        """`ResidualQuantizer.decode` for any number of stages: one gather and a sum."""
        return F.embedding(codes + self.offsets[:, : codes.shape[1]], self.table).sum(1)  # [B, T, D]

    def overlap_add(self, re: Tensor, im: Tensor, tail: Tensor) -> Tensor:
        """`ISTFTSynthesis._overlap_add` on real and imaginary parts `[B, N, bins]`: `[B, N * hop + delay]`."""
        frames = (re @ self.cos_basis + im @ self.sin_basis) * self.model.synthesis.window
        frames = frames.reshape(frames.shape[0], frames.shape[1], self.blocks, self.hop)
        last = self.blocks - 1  # overlap-add: sub-frame k's block i lands on output block k + i
        out = sum(F.pad(frames[:, :, i], (0, 0, i, last - i)) for i in range(self.blocks))  # [B, N + last, hop]
        out = out.reshape(out.shape[0], -1)
        delay = self.model.synthesis.delay
        return torch.cat([out[:, :delay] + tail, out[:, delay:]], dim=-1)

    def played(self, mag: Tensor, deviation: Tensor, tail: Tensor, phase: Tensor) -> tuple[Tensor, Tensor]:
        """`ISTFTSynthesis._played` in real arithmetic: (`[B, N * hop + delay]` samples, the next phase). A
        Python loop over the steps, which tracing unrolls: the graph takes as many frames as it was traced
        with (`_played_model`)."""
        synthesis = self.model.synthesis
        n, hop = synthesis.frames_per_step, self.hop
        advance = deviation.double() + synthesis._centre_advance(deviation.device)
        out, played = [], tail
        for start in range(0, mag.shape[1], n):
            step_mag = mag[:, start : start + n]
            own = torch.remainder(phase[:, None] + advance[:, start : start + n].cumsum(1), 2 * math.pi).to(mag.dtype)
            pending = played
            played = self.overlap_add(step_mag * torch.cos(own), step_mag * torch.sin(own), pending)
            for _ in range(synthesis.rephase_iters):
                windows = torch.stack([played[:, i * hop : i * hop + self.n_fft] for i in range(n)], dim=1)
                re, im = (windows @ self.analysis).chunk(2, dim=-1)
                re = re + 1e-30  # as modules.unit_phase: a silent bin takes phase 0
                scale = step_mag / torch.sqrt(re * re + im * im).clamp_min(1e-30)
                played = self.overlap_add(re * scale, im * scale, pending)
            out.append(played[:, : n * hop])
            played = played[:, n * hop :]
            phase = carried_phase(
                own[:, -1].double(), torch.atan2(im[:, -1], re[:, -1]).double(), synthesis.carry_share
            )
        return torch.cat([*out, played], dim=-1), phase

    def synthesise(self, spectrum: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
        """`ISTFTSynthesis.forward` streaming, without `skip`: (audio [B, T*hop], the next tail)."""
        synthesis = self.model.synthesis
        log_mag, phase = synthesis.split(spectrum)
        delay = synthesis.delay
        if _played_model(self.model):
            state = synthesis._streaming_state
            out, state.phase = self.played(synthesis.magnitudes(log_mag), phase, tail, state.phase)
            return out[:, :-delay], out[:, -delay:]
        if synthesis.phase == "propagated":
            phase = synthesis._propagate(phase)
        mag = synthesis.magnitudes(log_mag)
        out = self.overlap_add(mag * torch.cos(phase), mag * torch.sin(phase), tail)
        return out[:, :-delay], out[:, -delay:]

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
        "codebook_size": model.config["codebook_size"],
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
    if _played_model(model):  # one frame per call (`DecoderStep.played`)
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
