"""Padded batches: clips of different lengths through one forward pass, each getting exactly its lone result.

The model is causal, so right-padding never changes what a clip's own frames give: a clip keeps the first
`ceil(T_i / hop)` frames of a padded encode and the first `F_i * hop` samples of a padded decode. The
tokenize job (`training.tokenize`) and the Ray Serve batcher (`server.ray_serve`) both use these.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from codec.model import SimVQCodec


def encode_padded(model: SimVQCodec, clips: Sequence[torch.Tensor], n_stages: int | None = None) -> list[torch.Tensor]:
    """Encode mono clips `[T_i]` (tensors at the model rate, on its device) in one forward pass.

    The clips are right-padded with zeros to the longest and stacked into `[B, 1, T]`; clip i keeps the
    first `ceil(T_i / hop)` frames, `[S, F_i]` (its last partial frame is zero-padded either way).
    """
    hop = model.hop_length
    longest = max(int(c.shape[-1]) for c in clips)
    batch = clips[0].new_zeros(len(clips), 1, longest)
    for i, clip in enumerate(clips):
        batch[i, 0, : clip.shape[-1]] = clip
    with torch.inference_mode():
        codes = model.encode(batch, n_stages)
    return [codes[i, :, : -(-int(c.shape[-1]) // hop)] for i, c in enumerate(clips)]


def decode_padded(model: SimVQCodec, codes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Decode codes `[S, F_i]` (same S) in one forward pass; clip i keeps its first `F_i * hop` samples, `[1, T]`.

    Frames are right-padded with code 0 and silenced (`num_frames`); the decoder is causal, so the kept
    samples equal a lone decode."""
    hop = model.hop_length
    longest = max(int(c.shape[-1]) for c in codes)
    batch = codes[0].new_zeros(len(codes), codes[0].shape[0], longest)
    for i, c in enumerate(codes):
        batch[i, :, : c.shape[-1]] = c
    with torch.inference_mode():
        audio = model.decode(batch, torch.tensor([int(c.shape[-1]) for c in codes]))
    return [audio[i, :, : int(c.shape[-1]) * hop] for i, c in enumerate(codes)]
