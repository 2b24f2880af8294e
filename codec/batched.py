"""Many streams' next frame in one model step: the streams' states stacked into one table, a row each.

`StreamBatch(model)` runs one frame of each of any number of streams through one batched streaming step of
`model`, encode (`encode`) and decode (`decode`) apart. Each stream has a slot (`open()`): a row of every
state tensor of the model's streaming state, kept stacked in one table, so that a step gathers the rows of
the streams it runs (one copy per state tensor, whatever the number of streams), runs the model's own
streaming code on them and writes them back. Streams open and close between any two steps at no cost to
the others; `state(slot)` is a slot's state as the `StreamingState` that `model.stream()` holds.

A stream's output is bit for bit what it gets alone, whatever else is in the batch, on one intra-op thread:
- a matrix product of 1, 2 or 3 rows takes other kernels than one of 4 or more rows, and the latter agree
  row for row whatever the count (MKL, the BLAS of PyTorch's x86 builds): a step runs at least `MIN_ROWS`;
- elementwise functions whose SIMD and scalar code differ run through `codec.modules.vectorised`;
- every other operation of the model treats each row on its own (`tests/test_batched.py` checks all three).
Against `model.stream()` fed the same frames one by one, which multiplies single rows, outputs may differ
in their last bits; against the offline `encode` and `decode` of the same audio they agree.

The caller keeps what is not per row (`CALLER_STATE`): it passes whole frames (the last one zero-padded, as
`flush_encoder()` pads it), and a stream's first decoded frame comes back without its first `decoder_delay`
samples, as `model.decode` gives it in streaming mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from codec.model import HALVES, SimVQCodec, half_state
from codec.modules import MIN_ROWS
from codec.streaming import StreamingState


class StreamBatch:
    """The slots of the streams of `model` and one batched streaming step at a time over any of them."""

    def __init__(self, model: SimVQCodec, capacity: int = 16) -> None:
        self.model = model
        self._batch = model.init_streaming_state(MIN_ROWS)  # the model runs on this state, the rows of a step
        # Every per-row state tensor by (layer, field), stacked in a table whose first MIN_ROWS - 1 rows stay
        # fresh, to pad small steps. A step moves only the tensors of its own half of the model.
        self._pad = MIN_ROWS - 1
        self._halves = {half: [tuple(n.rsplit(".", 1)) for n in half_state(model, half)] for half in HALVES}
        self._table = {}
        for layer, field in (key for half in HALVES for key in self._halves[half]):
            fresh = getattr(self._batch.layers[layer], field)
            self._table[layer, field] = fresh.new_zeros(self._pad + capacity, *fresh.shape[1:])
        self._device = next(iter(self._table.values())).device
        self._free = list(range(self._pad + capacity - 1, self._pad - 1, -1))
        self._skip: dict[int, int] = {}  # slot -> leading decoded samples it still drops

    def open(self) -> int:
        """A new stream's slot, holding a fresh state."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        for table in self._table.values():
            table[slot].zero_()
        self._skip[slot] = self.model.decoder_delay
        return slot

    def close(self, slot: int) -> None:
        """Free a slot (its stream has ended)."""
        if slot not in self._skip:
            raise ValueError(f"slot {slot} is not open")
        del self._skip[slot]
        self._free.append(slot)

    def state(self, slot: int) -> StreamingState:
        """A copy of a slot's state as a stream of batch size 1 (`CodecStream(model, state)` goes on from it)."""
        state = self.model.init_streaming_state(1)
        for (layer, field), table in self._table.items():
            setattr(state.layers[layer], field, table[slot : slot + 1].clone())
        synthesis = state.layers.get("synthesis")
        if synthesis is not None:
            synthesis.skip = torch.full_like(synthesis.skip, self._skip[slot])
        return state

    def encode(self, slots: Sequence[int], frames: Tensor, n_stages: int | None = None) -> Tensor:
        """The next frame of each slot's stream, `frames` `[B, hop_length]` (B = len(slots)) -> codes `[B, S]`.

        Every stream gets the first `n_stages` stages (default all); a stream wanting fewer takes a prefix,
        which is what encoding with fewer stages gives."""
        hop = self.model.hop_length
        if frames.shape != (len(slots), hop):
            raise ValueError(
                f"expected one frame of {hop} samples per slot, [{len(slots)}, {hop}]; got {tuple(frames.shape)}"
            )
        index = self._gather(slots, "encode")
        wav = _pad_rows(frames.to(index.device), len(index))[:, None]
        with torch.inference_mode(), self.model.streaming(self._batch):
            codes = self.model.encode(wav, n_stages)
        self._scatter(index, len(slots), "encode")
        return codes[: len(slots), :, 0]

    def decode(self, slots: Sequence[int], codes: Tensor, stages: Sequence[int] | None = None) -> list[Tensor]:
        """The next frame of each slot's stream, codes `[B, S]` -> each stream's samples `[n]`: `hop_length` of
        them, `decoder_delay` fewer on a stream's first frame.

        `stages[b]` (default S each): stream b's frame has that many codes, the first of its row; the rest of
        the row is ignored (the frame decodes as it would alone)."""
        if codes.dim() != 2 or codes.shape[0] != len(slots):
            raise ValueError(f"expected codes [{len(slots)}, S], one frame per slot; got {tuple(codes.shape)}")
        index = self._gather(slots, "decode")
        codes = _pad_rows(codes.to(index.device), len(index))
        used = None if stages is None else [*stages, *[codes.shape[1]] * (len(index) - len(slots))]
        with torch.inference_mode():
            latents = self._latents(codes, used)[:, None]
            with self.model.streaming(self._batch):
                audio = self.model.decode_latents(latents)[:, 0]
        self._scatter(index, len(slots), "decode")
        out = []
        for b, slot in enumerate(slots):
            drop = min(self._skip[slot], audio.shape[-1])
            self._skip[slot] -= drop
            out.append(audio[b, drop:])
        return out

    def _latents(self, codes: Tensor, used: list[int] | None) -> Tensor:
        """Codes `[rows, S]` -> latents `[rows, D]`, row b summing its first `used[b]` stages' codes in the order
        `ResidualQuantizer.decode` sums them (a stage a row does not use adds an exact zero)."""
        self.model.quantizer._check_stages(codes.shape[1])
        fewest = codes.shape[1] if used is None else min(used)  # stages from here on are masked
        mask = None if fewest >= codes.shape[1] else torch.tensor(used, device=codes.device)[:, None]
        latents = None
        for i, stage in enumerate(self.model.quantizer.stages[: codes.shape[1]]):
            part = stage.lookup(codes[:, i])
            if i > 0 and i >= fewest:
                part = torch.where(mask > i, part, torch.zeros_like(part))
            latents = part if latents is None else latents + part
        return latents

    def _gather(self, slots: Sequence[int], half: str) -> Tensor:
        """Load the slots' rows of `half`'s state, padded with fresh rows to at least MIN_ROWS, into the batch
        state: their index."""
        if not slots:
            raise ValueError("a step needs at least one stream")
        for slot in slots:
            if slot not in self._skip:
                raise ValueError(f"slot {slot} is not open")
        index = torch.tensor([*slots, *range(max(0, MIN_ROWS - len(slots)))], device=self._device)
        for layer, field in self._halves[half]:
            setattr(self._batch.layers[layer], field, self._table[layer, field].index_select(0, index))
        self._batch.batch_size = len(index)
        root, synthesis = self._batch.layers[""], self._batch.layers.get("synthesis")
        root.samples = root.samples.new_zeros(len(index), 1, 0)  # the caller passes whole frames
        if synthesis is not None:
            synthesis.skip = torch.zeros_like(synthesis.skip)  # each stream drops its own first samples
        return index

    def _scatter(self, index: Tensor, rows: int, half: str) -> None:
        """Write the first `rows` rows of `half`'s batch state back to their slots."""
        for layer, field in self._halves[half]:
            self._table[layer, field].index_copy_(0, index[:rows], getattr(self._batch.layers[layer], field)[:rows])

    def _grow(self) -> None:
        old = next(iter(self._table.values())).shape[0]
        self._table = {key: torch.cat([t, torch.zeros_like(t[self._pad :])]) for key, t in self._table.items()}
        self._free.extend(range(2 * old - self._pad - 1, old - 1, -1))


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    return x if x.shape[0] >= rows else torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])
