"""Many streams' next frame in one model step: a batch is a stack of the streams' states.

`StreamBatch(model)` runs one frame of each of any number of streams through one batched streaming step of
`model`, encode (`encode`) and decode (`decode`) apart. Each stream keeps its own `StreamingState` of batch
size 1 (`new_state()`, the same value `model.stream()` holds); a step stacks the states it is given into one
batch, runs the model's own streaming code on it and splits the new states back. So streams join and leave
between any two steps at no cost to the others, and a state can go on through `model.stream()` calls.

A stream's output is bit for bit what it gets alone, whatever else is in the batch, on one intra-op thread:
- a matrix product of 1, 2 or 3 rows takes other kernels than one of 4 or more rows, and the latter agree
  row for row whatever the count (MKL, the BLAS of PyTorch's x86 builds): a batch is padded to `MIN_ROWS`;
- elementwise functions whose SIMD and scalar code differ run through `codec.modules.vectorised`;
- every other operation of the model treats each row on its own (`tests/test_batched.py` checks all three).
Against `model.stream()` fed the same frames one by one, which multiplies single rows, outputs may differ
in their last bits.

The caller keeps what is not per row (`CALLER_STATE`): it passes whole frames (the last one zero-padded, as
`flush_encoder()` pads it), and a stream's first decoded frame comes back without its first `decoder_delay`
samples, as `model.decode` gives it in streaming mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from codec.model import CALLER_STATE, SimVQCodec
from codec.streaming import StreamingState

MIN_ROWS = 4
"""Rows of the smallest batch a step runs: fewer take MKL's one- and two-row kernels (see the module docstring)."""


class StreamBatch:
    """One batched streaming step at a time over the states of any number of streams of `model`."""

    def __init__(self, model: SimVQCodec) -> None:
        self.model = model
        self._batch = model.init_streaming_state(MIN_ROWS)
        names = self._batch.tensors()
        # (layer, field) of every per-row tensor, with a zero row of it (a fresh state's value) for padding.
        self._fields = [(layer, f.name) for layer, state in self._batch.layers.items()
                        for f in dataclasses.fields(state)
                        if (f"{layer}.{f.name}" if layer else f.name) not in CALLER_STATE]
        self._zeros = {key: torch.zeros_like(names[f"{key[0]}.{key[1]}" if key[0] else key[1]][:1])
                       for key in self._fields}

    def new_state(self) -> StreamingState:
        """A fresh stream's state (batch size 1)."""
        return self.model.init_streaming_state(1)

    def encode(self, states: Sequence[StreamingState], frames: Tensor, n_stages: int | None = None) -> Tensor:
        """The next frame of each stream, `frames` `[B, hop_length]` (B = len(states)) -> codes `[B, S]`.

        Every stream gets the first `n_stages` stages (default all); a stream wanting fewer takes a prefix,
        which is what encoding with fewer stages gives."""
        hop = self.model.hop_length
        if frames.shape != (len(states), hop):
            raise ValueError(f"expected one frame of {hop} samples per state, [{len(states)}, {hop}]; "
                             f"got {tuple(frames.shape)}")
        rows = self._stack(states)
        wav = _pad_rows(frames, rows)[:, None]
        with torch.inference_mode(), self.model.streaming(self._batch):
            codes = self.model.encode(wav, n_stages)
        self._unstack(states)
        return codes[: len(states), :, 0]

    def decode(self, states: Sequence[StreamingState], codes: Tensor, stages: Sequence[int] | None = None
               ) -> list[Tensor]:
        """The next frame of each stream, codes `[B, S]` -> each stream's samples `[n]`: `hop_length` of
        them, `decoder_delay` fewer on a stream's first frame.

        `stages[b]` (default S each): stream b's frame has that many codes, the first of its row; the rest of
        the row is ignored (the frame decodes as it would alone)."""
        if codes.dim() != 2 or codes.shape[0] != len(states):
            raise ValueError(f"expected codes [{len(states)}, S], one frame per state; got {tuple(codes.shape)}")
        rows = self._stack(states)
        codes = _pad_rows(codes, rows)
        used = None if stages is None else torch.tensor(list(stages) + [codes.shape[1]] * (rows - len(states)))
        with torch.inference_mode():
            latents = self._latents(codes, used)[:, None]
            with self.model.streaming(self._batch):
                audio = self.model.decode_latents(latents)[:, 0]
        self._unstack(states)
        out = []
        for b, state in enumerate(states):
            synthesis = state.layers["synthesis"]
            drop = min(int(synthesis.skip), audio.shape[-1])
            synthesis.skip = synthesis.skip - drop
            out.append(audio[b, drop:])
        return out

    def _latents(self, codes: Tensor, used: Tensor | None) -> Tensor:
        """Codes `[rows, S]` -> latents `[rows, D]`, row b summing its first `used[b]` stages' codes in the order
        `ResidualQuantizer.decode` sums them (a stage a row does not use adds an exact zero)."""
        self.model.quantizer._check_stages(codes.shape[1])
        latents = None
        for i, stage in enumerate(self.model.quantizer.stages[: codes.shape[1]]):
            part = stage.lookup(codes[:, i])
            if used is not None and i > 0 and bool((used <= i).any()):
                part = torch.where((used > i)[:, None], part, torch.zeros_like(part))
            latents = part if latents is None else latents + part
        return latents

    def _stack(self, states: Sequence[StreamingState]) -> int:
        """Load the states, padded with fresh rows to at least MIN_ROWS, into the batch state: its row count."""
        if not states:
            raise ValueError("a step needs at least one stream")
        rows = max(len(states), MIN_ROWS)
        for key in self._fields:
            layer, field = key
            parts = [getattr(state.layers[layer], field) for state in states]
            if rows > len(states):
                parts.append(self._zeros[key].expand(rows - len(states), *self._zeros[key].shape[1:]))
            setattr(self._batch.layers[layer], field, torch.cat(parts))
        self._batch.batch_size = rows
        root, synthesis = self._batch.layers[""], self._batch.layers.get("synthesis")
        root.samples = root.samples.new_zeros(rows, 1, 0)  # the caller passes whole frames
        if synthesis is not None:
            synthesis.skip = torch.zeros_like(synthesis.skip)  # each stream drops its own first samples
        return rows

    def _unstack(self, states: Sequence[StreamingState]) -> None:
        for layer, field in self._fields:
            for state, row in zip(states, getattr(self._batch.layers[layer], field).split(1)):
                setattr(state.layers[layer], field, row)


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    return x if x.shape[0] >= rows else torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])
