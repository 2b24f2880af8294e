"""SimVQCodec: causal STFT encoder -> residual SimVQ -> causal ConvNeXt decoder with an inverse STFT.

All networks run at the frame rate (50 Hz by default), which is what makes the codec cheap: the
encoder stacks short causal STFT frames into one feature vector per codec frame, and the decoder
predicts short STFT frames that an inverse STFT overlap-adds (Vocos-style), instead of upsampling
through stacks of transposed convolutions. Nothing looks ahead: a frame is encoded once its last sample
has arrived (20 ms), and the decoder's short frames overlap by `n_fft - sub_hop` samples (15 ms), the
only other delay. The algorithmic latency is 35 ms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from codec.features import STFTFeatures
from codec.modules import ConvNeXtBlock, Linear, vectorised
from codec.pitch import PitchHead
from codec.synthesis import ISTFTSynthesis
from codec.quantizer import ResidualQuantizer
from codec.stages import shared_width
from codec.streaming import StreamingModule, StreamingState


@dataclass
class CodecOutput:
    """Training forward result.

    audio: `[B, 1, T]` reconstruction. codes: `[B, S, F]`. latents: `[B, F, D]` encoder output.
    commit_loss, codebook_loss, residual_loss: scalars (see `QuantizerResult`).
    stage_counts: one `[K_s]` histogram per stage.
    spectrum: `[B, F, synthesis.in_dim]` the decoder's output, the log magnitudes and phases the inverse STFT
    turns into `audio` (see `ISTFTSynthesis.split`).
    f0_logits, log_f0, voicing_logit: the pitch head's f0 distribution `[B, N, bins]`, its estimate and its
    voicing logit `[B, N]`, per synthesis sub-frame (None without a pitch head).
    """

    audio: Tensor
    codes: Tensor
    commit_loss: Tensor
    codebook_loss: Tensor
    residual_loss: Tensor
    stage_counts: tuple[Tensor, ...]
    latents: Tensor
    spectrum: Tensor
    f0_logits: Tensor | None = None
    log_f0: Tensor | None = None
    voicing_logit: Tensor | None = None


def _convnext_stack(dim: int, layers: int, kernel_size: int, expansion: int) -> nn.Sequential:
    return nn.Sequential(*(ConvNeXtBlock(dim, kernel_size, expansion) for _ in range(layers)))


@dataclass
class _PendingSamples:
    samples: Tensor  # `[B, 1, r]`, r < hop: the start of a frame that is not complete yet


RETIRED_ARGUMENTS = ("normalize_latent", "normalize_codes", "rephase_hears")
"""Constructor arguments of earlier versions that configs saved then may still name (`upgrade_config`)."""


def upgrade_config(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A model config saved by an earlier version -> this version's `SimVQCodec` arguments.

    The retired options are dropped where they name the behaviour that remains (no normalisation; re-phasing
    that hears what was played); a config that needs a removed behaviour is a ValueError naming it."""
    args = dict(saved)
    for key in ("normalize_latent", "normalize_codes"):
        if args.pop(key, False):
            raise ValueError(f"{key}=true names an option this version no longer has")
    hears = args.pop("rephase_hears", "played")
    if hears != "played" and args.get("rephase_iters"):
        raise ValueError(f"rephase_hears={hears!r} is gone: the re-phasing hears what was played")
    return args


CALLER_STATE = ("samples", "synthesis.skip")
"""The streaming state (`StreamingState.tensors()` names) that a caller feeding whole frames keeps itself: the
partial frame (always empty then) and the decoder's count of leading samples still to drop. The ONNX graphs
(`codec.onnx_export`) and the batched step (`codec.batched`) leave both out."""

HALVES = ("encode", "decode")
ENCODER_STATE = ("features.", "encoder.")
"""Name prefixes of the streaming state that encoding reads and writes; decoding's is the rest (`half_state`)."""


def half_state(model: SimVQCodec, half: str) -> list[str]:
    """The state one half of `model` carries from step to step, `StreamingState.tensors()` names in their order,
    `CALLER_STATE` left out: "encode" (the features and the encoder) or "decode" (the decoder and synthesis)."""
    if half not in HALVES:
        raise ValueError(f"half must be 'encode' or 'decode', got {half!r}")
    names = [n for n in model.init_streaming_state(1).tensors() if n not in CALLER_STATE]
    return [n for n in names if n.startswith(ENCODER_STATE) == (half == "encode")]


class SimVQCodec(StreamingModule):
    """The streaming SimVQ speech codec.

    Args:
        sample_rate: audio rate in Hz.
        hop_length: samples per codec frame (frame rate = sample_rate / hop_length).
        n_fft: window of the short STFT frames on both sides (samples).
        sub_hop: hop of the short STFT frames; `hop_length / sub_hop` of them make one codec frame.
        encoder_dim, encoder_layers: width and depth of the encoder's ConvNeXt stack.
        decoder_dim, decoder_layers: width and depth of the decoder's ConvNeXt stack.
        kernel_size: causal depthwise kernel of the ConvNeXt blocks, in frames.
        expansion: MLP expansion of the ConvNeXt blocks.
        latent_dim: D, the dimension that is quantized.
        n_stages: residual quantizer stages S.
        codebook_size: codes per stage K (a power of two), or one size per stage: a large first stage or two
            for the low rates under a ladder of small ones.
        quantizer: "simvq" or "vq" (the plain-VQ baseline).
        quantizer_dropout: fraction of training examples that use a random number of stages.
        dropout_weights: the relative odds of 1..S stages for those examples; None draws them uniformly
            (training only).
        code_dim: each stage's lookup dimension (linear maps in and out of the latent); None searches
            the latent itself. One value for every stage, or a list of one per stage.
        whiten_codes: whiten each stage's input with running statistics before the search (see `Codebook`);
            one value or a list of one per stage.
        principal_maps: each stage's maps are the principal directions of its input, fitted when its codes
            are drawn, instead of learned (see `Codebook`); one value or a list of one per stage.
        init_from_data: rescale each stage's codes to its input on the first training batch.
        phase: how the decoder's phase outputs are read: "absolute" phases, or "propagated" advances
            (see `ISTFTSynthesis`).
        straight_through: where the decoder's gradient enters the quantizer, "stage" or "latent" (see
            `ResidualQuantizer`; training only).
        quantize_fraction: share of training examples decoded from quantized latents; 0 trains the
            unquantized twin (see `ResidualQuantizer`; training only).
        pitch_prior: the decoder also predicts f0 and voicing (`PitchHead`), and moves each voiced bin's
            phase advance towards its nearest harmonic's (`ISTFTSynthesis.harmonic_deviation`) as far as the
            head trusts that prior for the bin. Needs phase="propagated".
        rephase_iters: causal Griffin-Lim iterations on each step's sub-frames, hearing what was played before
            them (`ISTFTSynthesis`; no parameters, so a trained model can take it up or drop it). Needs
            phase="propagated".
        carry_share: with re-phasing, the share of its phase correction that the running phase carries on
            (`ISTFTSynthesis`).
        advance_features: the encoder also sees each short frame's phase advance per bin (`STFTFeatures`);
            a model without them grows into one with them (`training.train.load_grown`).
    """

    TRAINING_OPTIONS = ("quantizer_dropout", "straight_through", "quantize_fraction", "dropout_weights")
    """Constructor arguments that act in training only (`ResidualQuantizer.set_training`): a run may change
    them between its phases."""

    def __init__(
        self,
        sample_rate: int = 16000,
        hop_length: int = 320,
        n_fft: int = 320,
        sub_hop: int = 80,
        encoder_dim: int = 256,
        encoder_layers: int = 4,
        decoder_dim: int = 256,
        decoder_layers: int = 8,
        kernel_size: int = 7,
        expansion: int = 3,
        latent_dim: int = 64,
        n_stages: int = 12,
        codebook_size: int | Sequence[int] = (16384, 16384) + (1024,) * 10,
        quantizer: str = "simvq",
        quantizer_dropout: float = 0.5,
        code_dim: int | None | Sequence[int | None] = (None, None) + (8,) * 10,
        whiten_codes: bool | Sequence[bool] = (False, False) + (True,) * 10,
        init_from_data: bool = True,
        phase: str = "propagated",
        straight_through: str = "latent",
        quantize_fraction: float = 0.5,
        pitch_prior: bool = True,
        rephase_iters: int = 1,
        carry_share: float = 0.3,
        advance_features: bool = True,
        principal_maps: bool | Sequence[bool] = (False, False) + (True,) * 10,
        dropout_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        if hop_length % sub_hop or n_fft < sub_hop:
            raise ValueError(f"hop_length ({hop_length}) must be a multiple of sub_hop ({sub_hop}) <= n_fft ({n_fft})")
        if pitch_prior and phase != "propagated":
            raise ValueError("pitch_prior needs phase='propagated' (the prior is a phase advance)")
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.sample_rate, self.hop_length = sample_rate, hop_length
        frames_per_step = hop_length // sub_hop

        self.features = STFTFeatures(n_fft, sub_hop, frames_per_step, advances=advance_features)
        self.encoder_in = nn.Sequential(Linear(self.features.out_dim, encoder_dim), nn.LayerNorm(encoder_dim))
        self.encoder = _convnext_stack(encoder_dim, encoder_layers, kernel_size, expansion)
        self.encoder_out = nn.Sequential(nn.LayerNorm(encoder_dim), Linear(encoder_dim, latent_dim))

        self.quantizer = ResidualQuantizer(
            latent_dim,
            n_stages,
            codebook_size,
            quantizer,
            quantizer_dropout,
            code_dim,
            whiten_codes,
            init_from_data,
            straight_through,
            quantize_fraction,
            principal_maps,
            dropout_weights,
        )

        self.synthesis = ISTFTSynthesis(n_fft, sub_hop, frames_per_step, phase, rephase_iters, carry_share)
        self.decoder_in = Linear(latent_dim, decoder_dim)
        self.decoder = _convnext_stack(decoder_dim, decoder_layers, kernel_size, expansion)
        self.decoder_out = nn.Sequential(nn.LayerNorm(decoder_dim), Linear(decoder_dim, self.synthesis.in_dim))
        self.pitch_head = PitchHead(decoder_dim, frames_per_step, self.synthesis.bins) if pitch_prior else None

    # --- properties a caller needs ---------------------------------------------------------------
    @property
    def frame_size(self) -> int:
        return self.hop_length

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def n_stages(self) -> int:
        return self.quantizer.n_stages

    num_codebooks = n_stages

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        """Codes per stage, K_s."""
        return self.quantizer.codebook_sizes

    @property
    def stage_bits(self) -> tuple[int, ...]:
        """Bits per code of each stage, log2(K_s)."""
        return tuple(k.bit_length() - 1 for k in self.codebook_sizes)

    @property
    def codebook_size(self) -> int:
        """K of a model whose stages all have the same size (a ValueError otherwise)."""
        if len(set(self.codebook_sizes)) != 1:
            raise ValueError(f"this model's stages differ in size ({self.codebook_sizes}): use codebook_sizes")
        return self.codebook_sizes[0]

    @property
    def bits_per_code(self) -> int | None:
        """log2(K) when every stage has K codes, else None (see `stage_bits`)."""
        return shared_width(self.stage_bits)

    @property
    def decoder_delay(self) -> int:
        """Samples by which streamed decoder output lags the stream (the iSTFT overlap, `n_fft - sub_hop`).

        The last this many samples of any decode need frames after the end of the signal: offline they
        come out as a short fade-out, streaming they come from `flush_decoder()`."""
        return self.synthesis.delay

    def bitrate(self, n_stages: int | None = None) -> float:
        """Nominal bits per second with `n_stages` stages (all by default)."""
        return sum(self.stage_bits[: n_stages or self.n_stages]) * self.frame_rate

    # --- the two halves ----------------------------------------------------------------------------
    def _check_audio(self, wav: Tensor) -> None:
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(f"expected mono audio shaped [B, 1, T], got {tuple(wav.shape)}")

    def encode_latents(self, wav: Tensor) -> Tensor:
        """`[B, 1, T]` (T a multiple of hop_length) -> latents `[B, T / hop, D]`."""
        x = self.encoder(self.encoder_in(self.features(wav)))
        return self.encoder_out(x)

    def decode_latents(self, latents: Tensor, num_frames: Tensor | None = None) -> Tensor:
        """Latents `[B, F, D]` -> audio `[B, 1, F * hop]` (`num_frames`: see `decode`)."""
        return self.synthesis(self.decode_spectrum(latents), num_frames)

    def decode_spectrum(self, latents: Tensor) -> Tensor:
        """Latents `[B, F, D]` -> the inverse STFT's input `[B, F, synthesis.in_dim]`."""
        return self._decode(latents)[0]

    def _decode(self, latents: Tensor, f0: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """Latents -> (spectrum, the pitch head's (f0 logits, log f0, voicing logit) or None).

        With a pitch head, each voiced bin's phase deviation moves towards the harmonic prior as far as the
        head trusts the prior there. The prior follows `f0` `[B, N]` (Hz, 0 = unvoiced; a training target)
        where it is given and not NaN, else the head's own estimate."""
        features = self.decoder(self.decoder_in(latents))
        spectrum = self.decoder_out(features)
        if self.pitch_head is None:
            return spectrum, None
        f0_logits, voicing_logit, trust_logit = self.pitch_head(features)
        log_f0 = self.pitch_head.log_f0(f0_logits)
        own = torch.where(voicing_logit > 0, log_f0.exp(), torch.zeros_like(log_f0)).detach()
        f0 = own if f0 is None else torch.where(f0.isnan(), own, f0)
        prior = self.synthesis.harmonic_deviation(f0 / self.sample_rate).float()
        trust = vectorised(torch.sigmoid, trust_logit) * (f0 > 0)[..., None]
        batch, steps, _ = spectrum.shape
        parts = spectrum.reshape(batch, prior.shape[1], 2, self.synthesis.bins)
        deviation = parts[:, :, 1]
        pull = trust * (prior - deviation.float())
        if spectrum.requires_grad or torch.jit.is_tracing():  # (the ONNX export has no in-place slices)
            parts = torch.stack([parts[:, :, 0], (deviation.float() + pull).to(parts.dtype)], dim=2)
        else:  # the same sums in place: no copy of the whole spectrum
            deviation.add_(pull)
        return parts.reshape(batch, steps, -1), (f0_logits, log_f0, voicing_logit)

    # --- streaming ---------------------------------------------------------------------------------
    def _init_streaming_state(self, batch_size: int) -> _PendingSamples:
        return _PendingSamples(self.synthesis.window.new_zeros(batch_size, 1, 0))

    def stream(self, batch_size: int = 1) -> CodecStream:
        """A new stream of `batch_size` items through this model, with its own state (see `CodecStream`)."""
        return CodecStream(self, self.init_streaming_state(batch_size))

    def _take_whole_frames(self, wav: Tensor) -> Tensor:
        state = self._streaming_state
        wav = torch.cat([state.samples, wav], dim=-1)
        whole = wav.shape[-1] - wav.shape[-1] % self.hop_length
        state.samples = wav[..., whole:]
        return wav[..., :whole]

    def flush_encoder(self, n_stages: int | None = None) -> Tensor:
        """End of a stream: zero-pad the buffered partial frame and return its codes (`[B, S, 0 or 1]`)."""
        state = self._streaming_state
        if state is None:
            raise RuntimeError("flush_encoder() is only meaningful inside model.streaming()")
        pending = state.samples.shape[-1]
        pad = (self.hop_length - pending) % self.hop_length
        return self.encode(state.samples.new_zeros(state.samples.shape[0], 1, pad), n_stages)

    def flush_decoder(self) -> Tensor:
        """End of a decoded stream: its last `decoder_delay` samples (`[B, 1, n]`; n = 0 if nothing was decoded)."""
        if not self.is_streaming:
            raise RuntimeError("flush_decoder() is only meaningful inside model.streaming()")
        return self.synthesis.flush()

    # --- public inference calls --------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, wav: Tensor, n_stages: int | None = None) -> Tensor:
        """Audio `[B, 1, T]` -> codes `[B, S, F]`.

        Offline, F = ceil(T / hop) and the last partial frame is zero-padded. Inside `model.streaming()`,
        any number of samples is accepted: the codes of the frames completed so far are returned and the
        rest waits for the next call (or `flush_encoder()`).
        """
        self._check_audio(wav)
        if self.is_streaming:
            wav = self._take_whole_frames(wav)
        elif wav.shape[-1] % self.hop_length:
            wav = nn.functional.pad(wav, (0, self.hop_length - wav.shape[-1] % self.hop_length))
        n = self.quantizer._check_stages(n_stages)
        if wav.shape[-1] == 0:
            return torch.zeros(wav.shape[0], n, 0, dtype=torch.long, device=wav.device)
        return self.quantizer.encode(self.encode_latents(wav), n)

    @torch.no_grad()
    def decode(self, codes: Tensor, num_frames: Tensor | None = None) -> Tensor:
        """Codes `[B, S, F]` (S <= n_stages) -> audio `[B, 1, F * hop]`.

        `num_frames` `[B]` (offline only) decodes a padded batch: item b's first `num_frames[b] * hop`
        samples then equal a decode of its first `num_frames[b]` frames alone.

        Inside `model.streaming()`, the samples completed so far: `decoder_delay` fewer than F * hop on the
        first call, then F * hop per call; `flush_decoder()` returns the rest at the end of the stream.
        """
        self._check_codes(codes)
        if codes.shape[-1] == 0:
            return codes.new_zeros(codes.shape[0], 1, 0, dtype=torch.float32)
        if self.is_streaming:
            if num_frames is not None:
                raise ValueError("num_frames is for padded offline batches, not streams")
            return self.decode_latents(self.quantizer.decode(codes))
        # Inference mode skips autograd's bookkeeping of each operation. Its tensors cannot be used by autograd
        # (as a loss's target, say): the copy can.
        with torch.inference_mode():
            audio = self.decode_latents(self.quantizer.decode(codes), num_frames)
        return audio.clone()

    def _check_codes(self, codes: Tensor) -> None:
        if codes.dim() != 3:
            raise ValueError(f"expected codes shaped [B, S, F], got {tuple(codes.shape)}")
        sizes = self.codebook_sizes[: codes.shape[1]]
        if codes.numel() and (codes.min() < 0 or bool((codes >= codes.new_tensor(sizes)[None, :, None]).any())):
            raise ValueError(f"codes must lie in [0, K) for each stage's size K {sizes}")

    def forward(self, wav: Tensor, n_stages: int | None = None, f0: Tensor | None = None) -> CodecOutput:
        """Training pass on `[B, 1, T]` with T a multiple of hop_length; `f0` `[B, T / sub_hop]` (Hz, 0 =
        unvoiced, NaN = the head's own) drives the harmonic prior in place of the pitch head's estimate (teacher
        forcing)."""
        self._check_audio(wav)
        if wav.shape[-1] % self.hop_length:
            raise ValueError(f"training audio length must be a multiple of hop_length={self.hop_length}")
        latents = self.encode_latents(wav)
        q = self.quantizer(latents, n_stages)
        spectrum, pitch = self._decode(q.quantized, f0)
        return CodecOutput(
            audio=self.synthesis(spectrum),
            spectrum=spectrum,
            codes=q.codes,
            commit_loss=q.commit_loss,
            codebook_loss=q.codebook_loss,
            residual_loss=q.residual_loss,
            stage_counts=q.stage_counts,
            latents=latents,
            **dict(zip(("f0_logits", "log_f0", "voicing_logit"), pitch or ())),
        )


class CodecStream:
    """One stream through a shared `SimVQCodec` (`model.stream(batch_size)`): the model's weights, its own state.

    Its calls are the model's streaming calls (see `SimVQCodec.encode` and `decode`) run on `state`, a
    `codec.streaming.StreamingState`. Any number of streams may run on one model, interleaved or from
    several threads at once.
    """

    def __init__(self, model: SimVQCodec, state: StreamingState) -> None:
        self.model, self.state = model, state

    def encode(self, wav: Tensor, n_stages: int | None = None) -> Tensor:
        """Audio `[B, 1, T]`, any T -> the codes `[B, S, n]` of the frames completed so far."""
        with self.model.streaming(self.state):
            return self.model.encode(wav, n_stages)

    def flush_encoder(self, n_stages: int | None = None) -> Tensor:
        """End of the audio: the codes of the zero-padded partial frame, if any (`[B, S, 0 or 1]`)."""
        with self.model.streaming(self.state):
            return self.model.flush_encoder(n_stages)

    def decode(self, codes: Tensor) -> Tensor:
        """Codes `[B, S, n]` -> the samples they complete `[B, 1, m]`."""
        with self.model.streaming(self.state):
            return self.model.decode(codes)

    def flush_decoder(self) -> Tensor:
        """End of the codes: the last `decoder_delay` samples (`[B, 1, n]`)."""
        with self.model.streaming(self.state):
            return self.model.flush_decoder()

    def clone(self) -> CodecStream:
        """A snapshot: continuing the copy gives what continuing this stream would, and leaves it as it is."""
        return CodecStream(self.model, self.state.clone())
