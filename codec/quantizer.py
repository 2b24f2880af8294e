"""SimVQ and plain VQ codebooks, and the residual quantizer that stacks them.

SimVQ ("Addressing Representation Collapse in Vector Quantized Models with One Linear Layer") keeps a
frozen random Gaussian codebook C [K, D] and learns one linear layer W: the codes are W(C). Every gradient
step on W moves the whole codebook, not only the selected codes, which is what keeps all codes in use.
Plain VQ learns C directly and serves as the collapse baseline.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from codec.modules import MIN_ROWS, is_power_of_two
from codec.stages import stages_or_all


@dataclass
class QuantizerResult:
    """What the residual quantizer returns.

    quantized: `[B, T, D]` sum of the selected codes, with straight-through gradients to the input.
    codes: `[B, S, T]` indices (S = stages used).
    commit_loss: mean over stages of ||z - sg(q)||^2 (pulls the encoder to the codes).
    codebook_loss: mean over stages of ||sg(z) - q||^2 (pulls the codes to the encoder).
    residual_loss: mean over stages of ||sg(r) - out(q)||^2 / mean sg(z0)^2 in the latent: how far each stage's
        contribution out(q) is from the residual r it was chosen for, relative to the latent's size.
    stage_counts: one `[K_s]` histogram per stage: how often each code was picked in this batch (for
        utilisation and perplexity; stages may differ in size).
    """

    quantized: Tensor
    codes: Tensor
    commit_loss: Tensor
    codebook_loss: Tensor
    residual_loss: Tensor
    stage_counts: tuple[Tensor, ...]


class _Frozen(NamedTuple):
    """What a stage computes once for inference (`Codebook._cached`): its codes `[K, d]` in the lookup space,
    their squared norms `[K]`, what each contributes to the latent `[K, D]`, and the whitening and colouring
    matrices (None without a whitener)."""

    codes: Tensor
    norms: Tensor
    output: Tensor
    matrices: tuple[Tensor, Tensor] | None


def mean_and_covariance(
    x: Tensor, weight: Tensor | None = None, across_ranks: bool = True
) -> tuple[Tensor, Tensor] | None:
    """Mean `[d]` and covariance `[d, d]` (float32) of the rows of `x [N, d]` with `weight [N]` (0 or 1; all
    rows by default), pooled over ranks unless `across_ranks` is False; None when they are not finite."""
    x = x.float()
    w = x.new_ones(x.shape[0], 1) if weight is None else weight.float()[:, None]
    sums = torch.cat([w.sum()[None], (x * w).sum(0), ((x * w).t() @ x).flatten()])
    if across_ranks and dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    if not bool(torch.isfinite(sums).all()):
        return None
    count, d = sums[0].clamp_min(1.0), x.shape[1]
    mean = sums[1 : 1 + d] / count
    return mean, sums[1 + d :].view(d, d) / count - torch.outer(mean, mean)


def principal_directions(x: Tensor, count: int, across_ranks: bool = False) -> tuple[Tensor, Tensor]:
    """The mean `[D]` of the rows of `x` `[N, D]` and their `count` orthonormal directions of the largest
    variance `[D, count]` (pooled over ranks when `across_ranks`)."""
    moments = mean_and_covariance(x, across_ranks=across_ranks)
    if moments is None:
        raise ValueError("principal directions of rows that are not all finite")
    return moments[0], torch.linalg.eigh(moments[1]).eigenvectors[:, -count:]  # eigenvalues ascend


class RunningWhitener(nn.Module):
    """ZCA whitening with running statistics: `(z - mean) @ cov^-1/2`, and its inverse.

    The encoder's output is far from isotropic (one direction, roughly loudness, carries most of its
    variance), while a Gaussian codebook is isotropic: searched as it is, a few codes at the edge of the
    cloud win every frame and the encoder learns to send nothing else (docs/model-card.md). Whitened, the
    stage input has the shape of the codebook from the first step. The statistics are buffers updated in
    training (no gradient flows through them); `eps` (relative to the mean variance) keeps directions that
    carry almost nothing from being blown up.

    Args:
        dim: d, the dimension whitened.
        momentum: weight of each training batch in the running mean and covariance.
        eps: ridge added to the covariance, relative to its mean eigenvalue.
    """

    def __init__(self, dim: int, momentum: float = 0.05, eps: float = 1e-2):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("cov", torch.eye(dim))
        self.register_buffer("seen", torch.tensor(False))

    @torch.no_grad()
    def update(self, z: Tensor, weight: Tensor, across_ranks: bool = True) -> None:
        """Fold the rows of `z [N, d]` with `weight [N]` (0 or 1) into the statistics (summed over ranks
        unless `across_ranks` is False)."""
        moments = mean_and_covariance(z, weight, across_ranks)
        if moments is None:
            return  # the trainer skips this step; a NaN here would poison every later search
        mean, cov = moments
        if bool(self.seen):
            self.mean.lerp_(mean, self.momentum)
            self.cov.lerp_(cov, self.momentum)
        else:
            self.mean.copy_(mean)
            self.cov.copy_(cov)
            self.seen.fill_(True)

    @torch.no_grad()
    def set_statistics(self, z: Tensor) -> None:
        """Replace the running statistics by the exact mean and covariance of the rows of `z [N, d]`, from this
        process alone (the trainer calibrates its EMA on rank 0 only)."""
        self.seen.fill_(False)  # the first update copies instead of blending
        self.update(z, z.new_ones(z.shape[0]), across_ranks=False)

    def matrices(self) -> tuple[Tensor, Tensor]:
        """(whitening, colouring) matrices `[d, d]`, both symmetric."""
        cov = self.cov.float()
        ridge = self.eps * cov.diagonal().mean().clamp_min(1e-12)
        values, vectors = torch.linalg.eigh(cov + ridge * torch.eye(cov.shape[0], device=cov.device))
        values = values.clamp_min(1e-12)
        whiten = (vectors * values.rsqrt()) @ vectors.t()
        colour = (vectors * values.sqrt()) @ vectors.t()
        return whiten.to(self.cov.dtype), colour.to(self.cov.dtype)


class Codebook(nn.Module):
    """One stage of plain VQ: a linear map into a small lookup space, nearest-neighbour search among learned
    codes there, a map back. `SimVQCodebook` is the stage the codec uses; this one is the collapse baseline.

    Searching in a low-dimensional space (`code_dim`, 8 by default) instead of the full latent is what keeps
    1024 codes in use (the factorised codes of "Improved VQGAN" and DAC): in 64 dimensions the encoder
    output fills a thin subspace, the isotropic codes do not, and the few codes whose off-subspace
    component happens to be small win every search.

    Args:
        dim: latent dimension D (what the stage reads and writes).
        codebook_size: K, a power of two.
        code_dim: d, the lookup dimension; None searches the latent itself (no projections).
        whiten: whiten the lookup-space input with running statistics (`RunningWhitener`) before the search
            and colour the selected code back after it.
        init_from_data: on the first training batch, rescale the codes to the spread of the stage's input
            (see `_init_from_data`), so that a stage whose input is much smaller or larger than the codes does
            not start with a handful of codes winning every search.
        principal_maps: the maps in and out of the lookup space are not learned: they are the `code_dim`
            principal directions of the stage's input (`fit_principal_maps`), fitted whenever its codes are
            drawn or initialised from data. Learned maps trained by the commitment loss, which a lookup
            space of fewer dimensions makes smaller, collapse to two or three directions: searched there,
            1024 codes refine a plane and leave the rest of the residual as it was.
    """

    kind = "vq"

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        code_dim: int | None = None,
        whiten: bool = False,
        init_from_data: bool = True,
        principal_maps: bool = False,
    ):
        super().__init__()
        if not is_power_of_two(codebook_size):
            raise ValueError(f"codebook_size must be a power of two, got {codebook_size}")
        if principal_maps and not code_dim:
            raise ValueError("principal_maps needs a code_dim: a stage searched in the latent itself has no maps")
        self.dim, self.codebook_size = dim, codebook_size
        self.code_dim = code_dim or dim
        if code_dim:
            self.in_proj, self.out_proj = nn.Linear(dim, code_dim), nn.Linear(code_dim, dim)
        else:
            self.in_proj, self.out_proj = nn.Identity(), nn.Identity()
        self.principal_maps = principal_maps
        for weight in (*self.in_proj.parameters(), *self.out_proj.parameters()) if principal_maps else ():
            weight.requires_grad_(False)
        self.whitener = RunningWhitener(self.code_dim) if whiten else None
        self._make_codes(torch.randn(codebook_size, self.code_dim) * self.code_dim**-0.5)
        self.register_buffer("initialized", torch.tensor(not init_from_data))
        self._cache: tuple[tuple, _Frozen] | None = None

    # The four things a kind of codebook defines: its codes from a Gaussian start, how they are computed,
    # which parameters define them, and how they are moved or replaced, wholesale or row by row.
    def _make_codes(self, gaussian: Tensor) -> None:
        self.codes = nn.Parameter(gaussian)

    def _compute_codebook(self) -> Tensor:
        return self.codes

    def codebook_parameters(self) -> list[nn.Parameter]:
        """What defines the codes (here the codes themselves)."""
        return [self.codes]

    def _set_codes(self, codes: Tensor | None = None, scale: float | Tensor = 1.0, shift: float | Tensor = 0.0) -> None:
        """Codes become `codes` (default: the current ones) times `scale` plus `shift`."""
        self.codes.copy_((self.codes if codes is None else codes) * scale + shift)

    def _replace_codes(self, rows: Tensor, codes: Tensor) -> None:
        """The codes `rows` become the lookup-space vectors `codes`; the others stay."""
        self.codes[rows] = codes

    def _whitening(self) -> tuple[Tensor, Tensor] | None:
        if self.whitener is None:
            return None
        return self.whitener.matrices() if torch.is_grad_enabled() else self._cached().matrices

    def lookup_input(self, x: Tensor) -> Tensor:
        """Latents `[N, D]` -> the lookup space `[N, d]` where the codes are searched."""
        return self._to_lookup(self.in_proj(x), self._whitening())

    def _to_lookup(self, z: Tensor, matrices: tuple[Tensor, Tensor] | None) -> Tensor:
        if matrices is not None:
            z = (z - self.whitener.mean) @ matrices[0]
        return z

    def to_latent(self, q: Tensor) -> Tensor:
        """Lookup-space vectors `[N, d]` -> their contribution to the latent `[N, D]`."""
        return self._to_latent(q, self._whitening())

    def _to_latent(self, q: Tensor, matrices: tuple[Tensor, Tensor] | None) -> Tensor:
        if matrices is not None:
            q = q @ matrices[1] + self.whitener.mean
        return self.out_proj(q)

    def codebook(self) -> Tensor:
        """The codes `[K, d]` in the lookup space."""
        if torch.is_grad_enabled():
            return self._compute_codebook()
        return self._cached().codes

    def output_codebook(self) -> Tensor:
        """What each code contributes to the latent, `[K, D]`."""
        if torch.is_grad_enabled():
            return self.to_latent(self._compute_codebook())
        return self._cached().output

    def _cached(self) -> _Frozen:
        """Without gradients, W(C), its squared norms, its image in the latent and the whitening matrices are
        computed once, until a weight or a statistic changes."""
        # In-place updates (optimiser steps, EMA, load_state_dict) bump a tensor's version counter. The module
        # dicts are read directly: `parameters()` and `buffers()` cost a third of a streamed frame's encode.
        versions, stack = [], [self]
        while stack:
            module = stack.pop()
            versions += [
                (id(t), t._version) for t in (*module._parameters.values(), *module._buffers.values()) if t is not None
            ]
            stack += [child for child in module._modules.values() if child is not None]
        key = tuple(versions)
        if self._cache is None or self._cache[0] != key:
            matrices = self.whitener.matrices() if self.whitener is not None else None
            codes = self._compute_codebook()
            self._cache = (key, _Frozen(codes, _squared_norms(codes), self._to_latent(codes, matrices), matrices))
        return self._cache[1]

    @torch.no_grad()
    def fit_principal_maps(self, x: Tensor, across_ranks: bool = False) -> None:
        """Make the map into the lookup space project latents `x [N, D]`, centred on their mean, onto their
        `code_dim` principal directions, and the map out of it take them back (pooled over ranks when
        `across_ranks`). A latent that lies in those directions comes back as it was."""
        mean, basis = principal_directions(x, self.code_dim, across_ranks)
        self.in_proj.weight.copy_(basis.t())
        self.in_proj.bias.copy_(-(mean @ basis))
        self.out_proj.weight.copy_(basis)
        self.out_proj.bias.copy_(mean)

    @torch.no_grad()
    def _init_from_data(self, z: Tensor) -> None:
        """Match the codes' mean and spread to the lookup-space input `z` (averaged over ranks under DDP)."""
        stats = torch.stack([z.mean(0), z.pow(2).mean(0)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
            stats /= dist.get_world_size()
        mean = stats[0]
        std = (stats[1] - mean.pow(2)).mean().clamp_min(1e-12).sqrt()
        # The Gaussian start has per-dimension std d^-1/2: scaled by std * sqrt(d), the codes have the input's spread.
        self._set_codes(scale=std * self.code_dim**0.5, shift=mean)
        self.initialized.fill_(True)

    @torch.no_grad()
    def draw_from(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Make the frozen codes a random sample of this stage's own inputs, latents `x [N, D]` (N >= K), and
        return the indices of the rows drawn.

        After whitening, a stage's input is far from Gaussian (it fills its space unevenly), so a Gaussian C
        leaves many codes where no input falls and too few where most do. Codes drawn from the inputs
        follow their density: on the shipped model's first stage they halve the squared error of matched
        Gaussian codes and use 98% of them (docs/architecture.md). W restarts at the identity and keeps
        moving all codes together, as in SimVQ. With `principal_maps`, the maps are fitted to `x` first."""
        if self.principal_maps:
            self.fit_principal_maps(x)
        projected = self.in_proj(x)
        if self.whitener is not None:
            self.whitener.set_statistics(projected)
        z = self._to_lookup(projected, self._whitening())
        if z.shape[0] < self.codebook_size:
            raise ValueError(f"drawing {self.codebook_size} codes needs at least as many frames, got {z.shape[0]}")
        rows = torch.randperm(z.shape[0], generator=generator, device=z.device)[: self.codebook_size]
        self._set_codes(z[rows])
        self.initialized.fill_(True)
        return rows

    @torch.no_grad()
    def redraw_unused(self, x: Tensor, generator: torch.Generator | None = None) -> int:
        """Move the codes that no latent of `x [N, D]` selects to inputs drawn in proportion to their squared
        error (the k-means++ rule), so they land where this stage quantizes worst; the codes in use stay
        where they are. Returns how many codes moved.

        Codes drawn from the inputs follow the encoder as it was when they were drawn; as it trains on, a
        few percent of them end where no input falls."""
        z = self.lookup_input(x)
        codebook = self.codebook()
        indices = self.nearest(z, codebook)
        unused = (torch.bincount(indices, minlength=self.codebook_size) == 0).nonzero().squeeze(1)
        if unused.numel():
            error = (z - codebook[indices]).pow(2).sum(1)
            self._replace_codes(unused, z[torch.multinomial(error, unused.numel(), generator=generator)])
        return unused.numel()

    @staticmethod
    def nearest(z: Tensor, codebook: Tensor, norms: Tensor | None = None) -> Tensor:
        """Indices of the nearest codes for lookup-space inputs `z [N, d]` (`norms`: the codes' squared norms
        `[K]`, computed here when not given)."""
        # ||z - c||^2 = ||z||^2 - 2 z.c + ||c||^2; the first term does not change the argmin.
        norms = _squared_norms(codebook) if norms is None else norms
        # On the CPU, blocks of `rows` whose distances stay in cache: 2.7x faster at 8192 codes, and the same
        # codes (no block has fewer than MIN_ROWS rows: the remainder joins the last block). Elsewhere one block.
        n = z.shape[0]
        rows = max(MIN_ROWS, SEARCH_BLOCK // codebook.shape[0]) if z.device.type == "cpu" else max(n, 1)
        bounds = [*range(0, max(n - rows, 1), rows), n]
        blocks = zip(bounds, bounds[1:])
        found = [first_argmin(torch.addmm(norms[None], z[a:b], codebook.t(), alpha=-2.0)) for a, b in blocks]
        return found[0] if len(found) == 1 else torch.cat(found)  # one block (a streaming step): no copy

    def forward(self, x: Tensor, weight: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Training search for latents `x [N, D]`; `weight [N]` (0 or 1) marks the rows that count.

        Returns (z, q, contribution, indices): the lookup-space input `z [N, d]` (with gradients to the
        encoder), the selected codes `q [N, d]` (with gradients to the codebook), their contribution to the
        latent `[N, D]` (straight-through: its gradient reaches the encoder through `z`) and the indices `[N]`."""
        fresh = self.training and not bool(self.initialized)  # one read of the flag (a sync on the GPU)
        if fresh and self.principal_maps:
            self.fit_principal_maps(x.detach(), across_ranks=True)
        projected = self.in_proj(x)
        if self.training and self.whitener is not None:
            weight = torch.ones(x.shape[0], device=x.device) if weight is None else weight
            self.whitener.update(projected.detach(), weight)
        matrices = self._whitening()  # once per step: the same matrices whiten and colour back
        z = self._to_lookup(projected, matrices)
        if fresh:
            self._init_from_data(z.detach())
        codebook = self.codebook()
        indices = self.nearest(z.detach(), codebook.detach())
        q = F.embedding(indices, codebook)
        contribution = self._to_latent(z + (q - z).detach(), matrices)  # straight-through estimator
        return z, q, contribution, indices

    def encode(self, x: Tensor) -> Tensor:
        """Indices `[N]` of the nearest codes for latents `x [N, D]` (inference)."""
        if torch.is_grad_enabled():
            return self.nearest(self.lookup_input(x), self.codebook())
        return self._encode_frozen(x, self._cached())

    def encode_with_contribution(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`encode(x)` and what those codes contribute to the latent, `lookup` of them (inference): the residual
        quantizer's step, which reads the stage's cached codes once (reading them walks the stage's tensors)."""
        if torch.is_grad_enabled():
            indices = self.encode(x)
            return indices, self.lookup(indices)
        frozen = self._cached()
        indices = self._encode_frozen(x, frozen)
        return indices, F.embedding(indices, frozen.output)

    def _encode_frozen(self, x: Tensor, frozen: _Frozen) -> Tensor:
        return self.nearest(self._to_lookup(self.in_proj(x), frozen.matrices), frozen.codes, frozen.norms)

    def lookup(self, indices: Tensor) -> Tensor:
        """Latent contribution `[..., D]` of code indices `[...]`."""
        return F.embedding(indices, self.output_codebook())


class SimVQCodebook(Codebook):
    """One SimVQ stage: a frozen codebook C [K, d] moved as a whole by one learned linear map W (with bias); the
    codes are W(C). Every gradient step on W moves all codes, not only those selected, which is what keeps
    them in use. C is Gaussian with std d^-1/2 until `draw_from` replaces it by a sample of the stage's own
    inputs. Arguments as `Codebook`."""

    kind = "simvq"

    def _make_codes(self, gaussian: Tensor) -> None:
        self.register_buffer("frozen_codebook", gaussian)
        self.proj = nn.Linear(self.code_dim, self.code_dim)
        nn.init.eye_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def _compute_codebook(self) -> Tensor:
        return self.proj(self.frozen_codebook)

    def codebook_parameters(self) -> list[nn.Parameter]:
        """What defines the codes: W and its bias."""
        return list(self.proj.parameters())

    def _set_codes(self, codes: Tensor | None = None, scale: float | Tensor = 1.0, shift: float | Tensor = 0.0) -> None:
        """W becomes `scale` times the identity and its bias `shift`; C becomes `codes` when given."""
        if codes is not None:
            self.frozen_codebook.copy_(codes)
        self.proj.weight.copy_(torch.eye(self.code_dim, device=self.proj.weight.device) * scale)
        self.proj.bias.copy_(torch.as_tensor(shift, dtype=self.proj.bias.dtype).expand_as(self.proj.bias))

    def _replace_codes(self, rows: Tensor, codes: Tensor) -> None:
        """C's `rows` become what W maps onto `codes` (W(c) = c W^T + b, so c = (codes - b) W^-T); W stays."""
        self.frozen_codebook[rows] = torch.linalg.solve(self.proj.weight, (codes - self.proj.bias).T).T


SEARCH_BLOCK = 1 << 20
"""Distances a CPU search computes at once (`Codebook.nearest`): 4 MB of float32, which stays in cache."""


ARGMIN_GROUP = 64
"""Columns `first_argmin` reduces to their minimum before it looks for an index."""


def first_argmin(distances: Tensor) -> Tensor:
    """`distances.argmin(1)` for `[N, K]`: each row's first index of its minimum, found in two steps on the CPU,
    where an index-tracking reduction is scalar code: the minimum of every group of ARGMIN_GROUP columns (a
    vectorised reduction), then the index inside the first group that holds the row's minimum. The same
    indices, in a quarter of the time at 16,384 codes; other devices take `argmin` as it is."""
    rows, width = distances.shape
    if distances.device.type != "cpu" or width % ARGMIN_GROUP or width == ARGMIN_GROUP:
        return distances.argmin(1)
    groups = distances.view(rows, width // ARGMIN_GROUP, ARGMIN_GROUP)
    group = groups.amin(2).argmin(1)  # the first group that holds the minimum
    inside = groups[torch.arange(rows, device=distances.device), group].argmin(1)
    return group * ARGMIN_GROUP + inside


def _squared_norms(codebook: Tensor) -> Tensor:
    return codebook.pow(2).sum(1)


CODEBOOKS: dict[str, type[Codebook]] = {"simvq": SimVQCodebook, "vq": Codebook}
"""The stage classes by the name a model config gives them (`quantizer`)."""


def per_stage(value: Any, n_stages: int, name: str) -> tuple:
    """One value per stage from a single value (every stage the same) or a list of `n_stages` values."""
    if not isinstance(value, (list, tuple)):
        return (value,) * n_stages
    if len(value) != n_stages:
        raise ValueError(f"{name} lists {len(value)} values for {n_stages} stages")
    return tuple(value)


class ResidualQuantizer(nn.Module):
    """Residual stages of `Codebook`: stage i quantizes what stages 0..i-1 left over.

    Args:
        dim: latent dimension D.
        n_stages: number of stages S; stage s adds log2(K_s) bits per frame.
        codebook_size: K, the size of every stage, or one size per stage (e.g. a large first stage for the low
            rates under a ladder of small ones).
        kind: "simvq" (`SimVQCodebook`) or "vq" (plain `Codebook`, the collapse baseline).
        quantizer_dropout: in training, the fraction of examples that use a random number of stages
            1..S instead of all S, so that one model serves every bitrate.
        dropout_weights: the relative odds of 1..S stages for those examples (one weight per stage count,
            S in all); None draws them uniformly. Weight on the stage counts that users pick trains their
            rates more often.
        quantize_fraction: in training, the fraction of examples whose decoder input is quantized; the others
            pass the encoder's latent through unchanged (Mimi trains with 0.5). Their codes are still searched,
            so the stages keep learning their residuals. 0 trains the unquantized twin, the ceiling that
            measures what the quantizer costs; inference always quantizes.
        code_dim, whiten, init_from_data, principal_maps: see `Codebook`; `code_dim`, `whiten` and
            `principal_maps` may list one value per stage (large stages searched in the latent itself, small
            ones in whitened 8-dim lookups).
        straight_through: where the decoder's gradient enters. "stage": through each stage's maps into and
            out of its lookup space (DAC's factorised codes), so the decoder also shapes what a code
            contributes. "latent": straight to the encoder's latent (VQ-VAE, SoundStream); the stages'
            maps then learn only from `residual_loss` to reconstruct their residual, which makes the
            quantizer a residual quantizer of the latent by construction. The forward values are the same.
    """

    def __init__(
        self,
        dim: int = 64,
        n_stages: int = 12,
        codebook_size: int | Sequence[int] = 1024,
        kind: str = "simvq",
        quantizer_dropout: float = 0.5,
        code_dim: int | None | Sequence[int | None] = None,
        whiten: bool | Sequence[bool] = False,
        init_from_data: bool = True,
        straight_through: str = "stage",
        quantize_fraction: float = 1.0,
        principal_maps: bool | Sequence[bool] = False,
        dropout_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        self.n_stages = n_stages
        self.set_training(quantizer_dropout, straight_through, quantize_fraction, dropout_weights)
        self.codebook_sizes = tuple(int(k) for k in per_stage(codebook_size, n_stages, "codebook_size"))
        lookups = zip(
            self.codebook_sizes,
            per_stage(code_dim, n_stages, "code_dim"),
            per_stage(whiten, n_stages, "whiten"),
            per_stage(principal_maps, n_stages, "principal_maps"),
        )
        self.stages = nn.ModuleList(
            CODEBOOKS[kind](dim, size, lookup_dim, whitened, init_from_data, principal)
            for size, lookup_dim, whitened, principal in lookups
        )

    def set_training(
        self,
        quantizer_dropout: float,
        straight_through: str,
        quantize_fraction: float,
        dropout_weights: Sequence[float] | None = None,
    ) -> None:
        """Set the options that act in training only (see the class): a run may change them between phases."""
        if straight_through not in ("stage", "latent"):
            raise ValueError(f"straight_through must be 'stage' or 'latent', got {straight_through!r}")
        if not 0.0 <= quantize_fraction <= 1.0:
            raise ValueError(f"quantize_fraction must lie in [0, 1], got {quantize_fraction}")
        if not 0.0 <= quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout must lie in [0, 1], got {quantizer_dropout}")
        if dropout_weights is not None:
            weights = [float(w) for w in dropout_weights]
            if len(weights) != self.n_stages or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(
                    f"dropout_weights needs {self.n_stages} weights >= 0, one per stage count, not all 0; got {weights}"
                )
            dropout_weights = weights
        self.quantizer_dropout, self.straight_through = quantizer_dropout, straight_through
        self.quantize_fraction, self.dropout_weights = quantize_fraction, dropout_weights

    def _check_stages(self, n_stages: int | None) -> int:
        return stages_or_all(n_stages, self.n_stages)

    def forward(self, z: Tensor, n_stages: int | None = None) -> QuantizerResult:
        """Quantize `z [B, T, D]` with the first `n_stages` stages (all by default)."""
        n = self._check_stages(n_stages)
        batch, steps, dim = z.shape
        flat = z.reshape(batch * steps, dim)
        # Per example, how many stages are active (quantizer dropout in training).
        active = torch.full((batch,), n, device=z.device)
        if self.training and self.quantizer_dropout > 0:
            dropped = torch.rand(batch, device=z.device) < self.quantizer_dropout
            if self.dropout_weights is None:
                random_n = torch.randint(1, n + 1, (batch,), device=z.device)
            else:
                odds = torch.tensor(self.dropout_weights[:n], device=z.device)
                random_n = 1 + torch.multinomial(odds, batch, replacement=True)
            active = torch.where(dropped, random_n, active)
        if self.training and not all(bool(s.initialized) for s in self.stages[:n]):
            active.fill_(n)  # data-dependent init sees every stage's real residual
        frame_active = active.repeat_interleave(steps)

        residual, quantized = flat, torch.zeros_like(flat)
        codes, counts, commit, codebook, fit = [], [], flat.new_zeros(()), flat.new_zeros(()), flat.new_zeros(())
        latent_scale = flat.detach().float().pow(2).mean().clamp_min(1e-12)
        for i, stage in enumerate(self.stages[:n]):
            mask = (frame_active > i).to(flat.dtype)[:, None]
            z, q, contribution, idx = stage(residual, mask[:, 0])
            n_active = mask.sum().clamp_min(1.0) * z.shape[1]
            # Both losses live in the stage's lookup space, where the search happens.
            commit = commit + ((z - q.detach()).pow(2) * mask).sum() / n_active
            codebook = codebook + ((z.detach() - q).pow(2) * mask).sum() / n_active
            # The map back to the latent has no target of its own otherwise: unchecked, a stage's contribution
            # can outgrow the latent, and the next stage's "residual" then mostly restates this stage's code.
            if self.training:
                # "latent": the maps learn through the straight-through contribution (a linear autoencoder
                # of the residual around the lookup); "stage": only the map back, from the selected code.
                fitted = contribution if self.straight_through == "latent" else stage.to_latent(q)
                misfit = (residual.detach() - fitted).float().pow(2) * mask
                fit = fit + misfit.sum() / (mask.sum().clamp_min(1.0) * dim) / latent_scale
            quantized = quantized + contribution * mask
            residual = residual - contribution.detach() * mask
            codes.append(idx)
            counts.append(torch.bincount(idx[frame_active > i], minlength=stage.codebook_size))
        if self.straight_through == "latent":
            quantized = flat + (quantized - flat).detach()
        if self.training and self.quantize_fraction < 1.0:
            bypass = torch.rand(batch, device=z.device) >= self.quantize_fraction
            quantized = torch.where(bypass.repeat_interleave(steps)[:, None], flat, quantized)
        return QuantizerResult(
            quantized=quantized.reshape(batch, steps, dim),
            codes=torch.stack(codes, 1).reshape(batch, steps, n).transpose(1, 2),
            commit_loss=commit / n,
            codebook_loss=codebook / n,
            residual_loss=fit / n,
            stage_counts=tuple(counts),
        )

    @torch.no_grad()
    def draw_codebooks(
        self,
        z: Tensor,
        stages: Collection[int] | None = None,
        generator: torch.Generator | None = None,
        unused_only: bool = False,
    ) -> list[int]:
        """Draw the frozen codes of `stages` (indices; all by default) from their own inputs, stage after stage,
        for latents `z [..., D]` with at least as many frames as those codebooks hold together
        (`Codebook.draw_from`); with `unused_only`, only the codes that none of those frames selects
        (`Codebook.redraw_unused`). Returns how many codes each stage drew.

        A frame drawn as a code leaves a residual of exactly zero, so it is not drawn from again: kept, the
        frames a large first stage drew would give the next stages that many copies of one code."""
        residual, drawn = z.reshape(-1, z.shape[-1]), []
        for i, stage in enumerate(self.stages):
            keep = None
            if stages is not None and i not in stages:
                drawn.append(0)
            elif unused_only:
                drawn.append(stage.redraw_unused(residual, generator))
            else:
                keep = torch.ones(len(residual), dtype=torch.bool, device=residual.device)
                keep[stage.draw_from(residual, generator)] = False
                drawn.append(stage.codebook_size)
            residual = residual - stage.encode_with_contribution(residual)[1]
            if keep is not None:
                residual = residual[keep]
        return drawn

    @torch.no_grad()
    def calibrate_whiteners(self, z: Tensor) -> None:
        """Re-estimate every stage's whitening statistics from latents `z [..., D]`, stage after stage (each
        stage's residual depends on the stages before it).

        The running statistics describe the `in_proj` that produced them. A copy whose weights were averaged
        (the trainer's EMA) has a different `in_proj`, and searching with the trained model's statistics
        mis-whitens it: calibrate it on real latents before use."""
        residual = z.reshape(-1, z.shape[-1])
        for stage in self.stages:
            if stage.whitener is not None:
                stage.whitener.set_statistics(stage.in_proj(residual))
            residual = residual - stage.encode_with_contribution(residual)[1]

    def encode(self, z: Tensor, n_stages: int | None = None) -> Tensor:
        """Indices `[B, S, T]` for `z [B, T, D]` (inference: no losses, no dropout)."""
        n = self._check_stages(n_stages)
        batch, steps, dim = z.shape
        residual = z.reshape(batch * steps, dim)
        codes = []
        for stage in self.stages[:n]:
            idx, contribution = stage.encode_with_contribution(residual)
            residual = residual - contribution
            codes.append(idx)
        return torch.stack(codes, 1).reshape(batch, steps, n).transpose(1, 2)

    def decode(self, codes: Tensor) -> Tensor:
        """Latents `[B, T, D]` for indices `[B, S, T]` with 1 <= S <= n_stages."""
        self._check_stages(codes.shape[1])
        return sum(stage.lookup(codes[:, i]) for i, stage in enumerate(self.stages[: codes.shape[1]]))
