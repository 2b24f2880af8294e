"""SimVQ and plain VQ codebooks, and the residual quantizer that stacks them.

SimVQ ("Addressing Representation Collapse in Vector Quantized Models with One Linear Layer") keeps a
frozen random Gaussian codebook C [K, D] and learns one linear layer W: the codes are W(C). Every gradient
step on W moves the whole codebook, not only the selected codes, which is what keeps all codes in use.
Plain VQ learns C directly and serves as the collapse baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from codec.modules import is_power_of_two


@dataclass
class QuantizerResult:
    """What the residual quantizer returns.

    quantized: `[B, T, D]` sum of the selected codes, with straight-through gradients to the input.
    codes: `[B, S, T]` indices (S = stages used).
    commit_loss: mean over stages of ||z - sg(q)||^2 (pulls the encoder to the codes).
    codebook_loss: mean over stages of ||sg(z) - q||^2 (pulls the codes to the encoder).
    stage_counts: `[S, K]` how often each code was picked in this batch (for utilisation and perplexity).
    """

    quantized: Tensor
    codes: Tensor
    commit_loss: Tensor
    codebook_loss: Tensor
    stage_counts: Tensor


class Codebook(nn.Module):
    """One stage: nearest-neighbour search in squared L2 over the full dimension.

    Args:
        dim: code dimension D.
        codebook_size: K, a power of two.
        kind: "simvq" (frozen Gaussian C with std D^-1/2, learned linear W with bias, codes = W(C)) or
            "vq" (learned codes, initialised like C).
        init_from_data: on the first training batch, rescale the codes to the spread of the input (see
            `_init_from_data`), so that a stage whose input is much smaller or larger than the codes does not
            start with a handful of codes winning every search.
    """

    def __init__(self, dim: int, codebook_size: int, kind: str = "simvq", init_from_data: bool = True):
        super().__init__()
        if not is_power_of_two(codebook_size):
            raise ValueError(f"codebook_size must be a power of two, got {codebook_size}")
        if kind not in ("simvq", "vq"):
            raise ValueError(f"quantizer kind must be 'simvq' or 'vq', got {kind!r}")
        self.kind, self.dim, self.codebook_size = kind, dim, codebook_size
        gaussian = torch.randn(codebook_size, dim) * dim**-0.5
        if kind == "simvq":
            self.register_buffer("frozen_codebook", gaussian)
            self.proj = nn.Linear(dim, dim)
            nn.init.eye_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            self.codes = nn.Parameter(gaussian)
        self.register_buffer("initialized", torch.tensor(not init_from_data))
        self._cache: tuple[tuple, Tensor] | None = None

    def _compute_codebook(self) -> Tensor:
        return self.proj(self.frozen_codebook) if self.kind == "simvq" else self.codes

    def codebook(self) -> Tensor:
        """The codes `[K, D]`. Without gradients W(C) is computed once and cached until a weight changes."""
        if torch.is_grad_enabled():
            return self._compute_codebook()
        # In-place updates (optimiser steps, EMA, load_state_dict) bump a tensor's version counter.
        sources = [self.proj.weight, self.proj.bias, self.frozen_codebook] if self.kind == "simvq" else [self.codes]
        key = tuple((id(t), t._version) for t in sources)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._compute_codebook())
        return self._cache[1]

    @torch.no_grad()
    def _init_from_data(self, z: Tensor) -> None:
        """Match the codes' mean and spread to the input's (averaged over ranks under DDP)."""
        stats = torch.stack([z.mean(0), z.pow(2).mean(0)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
            stats /= dist.get_world_size()
        mean = stats[0]
        std = (stats[1] - mean.pow(2)).mean().clamp_min(1e-12).sqrt()
        # C has per-dimension std D^-1/2, so W = std * sqrt(D) * I gives codes with the input's spread.
        if self.kind == "simvq":
            self.proj.weight.copy_(torch.eye(self.dim, device=z.device) * std * self.dim**0.5)
            self.proj.bias.copy_(mean)
        else:
            self.codes.mul_(std * self.dim**0.5).add_(mean)
        self.initialized.fill_(True)

    def nearest(self, z: Tensor, codebook: Tensor) -> Tensor:
        """Indices of the nearest codes for `z [N, D]`."""
        # ||z - c||^2 = ||z||^2 - 2 z.c + ||c||^2; the first term does not change the argmin.
        distances = torch.addmm(codebook.pow(2).sum(1)[None], z, codebook.t(), alpha=-2.0)
        return distances.argmin(dim=1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """`z [N, D]` -> (codes selected `[N, D]` with gradients to the codebook, indices `[N]`)."""
        if self.training and not bool(self.initialized):
            self._init_from_data(z.detach())
        codebook = self.codebook()
        indices = self.nearest(z.detach(), codebook.detach())
        return F.embedding(indices, codebook), indices

    def lookup(self, indices: Tensor) -> Tensor:
        return F.embedding(indices, self.codebook())


class ResidualQuantizer(nn.Module):
    """Residual stages of `Codebook`: stage i quantizes what stages 0..i-1 left over.

    Args:
        dim: latent dimension D.
        n_stages: number of stages S; each adds log2(K) bits per frame.
        codebook_size: K per stage.
        kind: "simvq" or "vq" (see `Codebook`).
        quantizer_dropout: in training, the fraction of examples that use a random number of stages
            1..S instead of all S, so that one model serves every bitrate.
        init_from_data: see `Codebook`.
    """

    def __init__(
        self,
        dim: int = 64,
        n_stages: int = 12,
        codebook_size: int = 1024,
        kind: str = "simvq",
        quantizer_dropout: float = 0.5,
        init_from_data: bool = True,
    ):
        super().__init__()
        self.n_stages, self.codebook_size, self.quantizer_dropout = n_stages, codebook_size, quantizer_dropout
        self.stages = nn.ModuleList(Codebook(dim, codebook_size, kind, init_from_data) for _ in range(n_stages))

    def _check_stages(self, n_stages: int | None) -> int:
        n = self.n_stages if n_stages is None else int(n_stages)
        if not 1 <= n <= self.n_stages:
            raise ValueError(f"n_stages must be between 1 and {self.n_stages}, got {n}")
        return n

    def forward(self, z: Tensor, n_stages: int | None = None) -> QuantizerResult:
        """Quantize `z [B, T, D]` with the first `n_stages` stages (all by default)."""
        n = self._check_stages(n_stages)
        batch, steps, dim = z.shape
        flat = z.reshape(batch * steps, dim)
        # Per example, how many stages are active (quantizer dropout in training).
        active = torch.full((batch,), n, device=z.device)
        if self.training and self.quantizer_dropout > 0:
            dropped = torch.rand(batch, device=z.device) < self.quantizer_dropout
            random_n = torch.randint(1, n + 1, (batch,), device=z.device)
            active = torch.where(dropped, random_n, active)
        if self.training and not all(bool(s.initialized) for s in self.stages[:n]):
            active.fill_(n)  # data-dependent init sees every stage's real residual
        frame_active = active.repeat_interleave(steps)

        residual, quantized = flat, torch.zeros_like(flat)
        codes, counts, commit, codebook = [], [], flat.new_zeros(()), flat.new_zeros(())
        for i, stage in enumerate(self.stages[:n]):
            q, idx = stage(residual)
            mask = (frame_active > i).to(flat.dtype)[:, None]
            n_active = mask.sum().clamp_min(1.0) * dim
            commit = commit + ((residual - q.detach()).pow(2) * mask).sum() / n_active
            codebook = codebook + ((residual.detach() - q).pow(2) * mask).sum() / n_active
            q_st = residual + (q - residual).detach()  # straight-through estimator
            quantized = quantized + q_st * mask
            residual = residual - q.detach() * mask
            codes.append(idx)
            counts.append(torch.bincount(idx[frame_active > i], minlength=self.codebook_size))
        return QuantizerResult(
            quantized=quantized.reshape(batch, steps, dim),
            codes=torch.stack(codes, 1).reshape(batch, steps, n).transpose(1, 2),
            commit_loss=commit / n,
            codebook_loss=codebook / n,
            stage_counts=torch.stack(counts),
        )

    def encode(self, z: Tensor, n_stages: int | None = None) -> Tensor:
        """Indices `[B, S, T]` for `z [B, T, D]` (inference: no losses, no dropout)."""
        n = self._check_stages(n_stages)
        batch, steps, dim = z.shape
        residual = z.reshape(batch * steps, dim)
        codes = []
        for stage in self.stages[:n]:
            codebook = stage.codebook()
            idx = stage.nearest(residual, codebook)
            residual = residual - F.embedding(idx, codebook)
            codes.append(idx)
        return torch.stack(codes, 1).reshape(batch, steps, n).transpose(1, 2)

    def decode(self, codes: Tensor) -> Tensor:
        """Latents `[B, T, D]` for indices `[B, S, T]` with 1 <= S <= n_stages."""
        self._check_stages(codes.shape[1])
        return sum(stage.lookup(codes[:, i]) for i, stage in enumerate(self.stages[: codes.shape[1]]))
