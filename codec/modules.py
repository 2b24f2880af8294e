"""Generic building blocks: the packed `Linear`, the causal convolution, the ConvNeXt block, tensor helpers."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codec.streaming import StreamingModule


_PACKED: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple, Tensor]] = weakref.WeakKeyDictionary()
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class Linear(nn.Linear):
    """`nn.Linear` whose inference on the CPU multiplies by its weight packed once for oneDNN.

    MKL's matrix product (what `F.linear` calls) repacks the weight on every call, which costs more than the
    product itself when a streaming step multiplies a few rows by a weight that is no longer in the cache; the
    packed product reads it once, in the layout its kernel wants. Its rows also agree bit for bit whatever their
    number (one row aside), which batched streaming needs (`codec.batched`). Training (gradients on), other
    devices and dtypes, and tracing (ONNX export) use `F.linear`. The packed copy is made again after the weight
    changes (its version counter moves) and is not part of the module's state."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            not _ONEDNN
            or torch.is_grad_enabled()
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or self.weight.dtype != torch.float32
            or torch.jit.is_tracing()
        ):
            return F.linear(x, self.weight, self.bias)
        key = (self.weight.data_ptr(), self.weight._version, tuple(self.weight.shape))
        cached = _PACKED.get(self)
        if cached is None or cached[0] != key:
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None))
            _PACKED[self] = cached
        return torch.ops.mkldnn._linear_pointwise(x, cached[1], self.bias, "none", [], "")


@dataclass
class HistoryState:
    history: Tensor  # the last inputs the next call needs as left context


class CausalConv1d(StreamingModule):
    """Stride-1 causal 1-D convolution: output t sees inputs t - (kernel-1)*dilation ... t.

    Args:
        in_channels, out_channels, kernel_size, dilation, groups: as in `nn.Conv1d`.
    Input and output are `[B, C, T]`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation, groups=groups)
        self.context = (kernel_size - 1) * dilation

    def _init_streaming_state(self, batch_size: int) -> HistoryState:
        weight = self.conv.weight
        return HistoryState(weight.new_zeros(batch_size, self.conv.in_channels, self.context))

    def forward(self, x: Tensor) -> Tensor:
        state = self._streaming_state
        if state is None:
            x = F.pad(x, (self.context, 0))
        else:
            x = torch.cat([state.history, x], dim=-1)
            state.history = x[..., x.shape[-1] - self.context :]
        return self.conv(x)


class ConvNeXtBlock(nn.Module):
    """Causal ConvNeXt block on frame-rate features (Vocos style).

    Depthwise causal conv, LayerNorm, pointwise MLP, layer scale, residual.

    Args:
        dim: channels C.
        kernel_size: depthwise kernel, in frames.
        expansion: hidden width of the MLP is `expansion * dim`.
        layer_scale: initial value of the per-channel residual scale.
    Input and output are `[B, T, C]` (channels last, so the pointwise layers are plain matmuls).
    """

    def __init__(self, dim: int, kernel_size: int = 7, expansion: int = 3, layer_scale: float = 0.1):
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, kernel_size, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = Linear(dim, expansion * dim)
        self.pw2 = Linear(expansion * dim, dim)
        self.scale = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(channels_first(x)).transpose(1, 2)
        y = self.pw2(F.gelu(self.pw1(self.norm(y))))
        return x + self.scale * y


TRANSPOSED_ROW_BY_ROW = 256  # frames: from here on `channels_first` copies


def channels_first(x: Tensor) -> Tensor:
    """`[B, T, C]` -> `[B, C, T]`. A long one on the CPU is copied row by row: PyTorch copies a 2-D transpose
    in cache-sized blocks, and a 3-D one element by element, 4 times slower for a minute of frames. The values
    are the same; a short one (a streaming step) stays a view, which the convolution takes as it is."""
    if x.shape[1] < TRANSPOSED_ROW_BY_ROW or x.device.type != "cpu" or x.requires_grad:
        return x.transpose(1, 2)
    out = x.new_empty(x.shape[0], x.shape[2], x.shape[1])
    for row, transposed in zip(x, out):
        transposed.copy_(row.mT)
    return out


def constant(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A function of hashable arguments whose tensors are computed once (outside inference mode, so that
    training can save them for backward) and shared: constants of the per-frame path, kept out of it."""
    cached = functools.lru_cache(maxsize=None)(fn)

    @functools.wraps(fn)
    def wrapper(*args):  # noqa: ANN002, ANN202 - the wrapped function's own signature
        with torch.inference_mode(False), torch.no_grad():
            return cached(*args)

    return wrapper


MIN_ROWS = 4
"""Rows of the smallest matrix product whose rows come out as they would in any larger one: MKL (the BLAS of
PyTorch's x86 builds) multiplies 1, 2 or 3 rows with other kernels than 4 or more, and the latter agree row
for row whatever the count. A batched step runs at least this many (`codec.batched`), and a search cut into
blocks never leaves a smaller one (`codec.quantizer`)."""

VECTOR_BLOCK = 64
"""Elements that any of PyTorch's CPU kernels takes through its SIMD code at once (a multiple of every block)."""


def vectorised(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """`fn(x)` for an elementwise `fn`, every element through the kernel's SIMD code.

    A CPU kernel runs whole blocks of a tensor through SIMD code and the last few elements through scalar
    code, and for some functions (`sgn`, `angle`, `sigmoid`, `pow`, complex `abs`) the two differ in the last
    bit: an element's result would depend on where in a batch or a chunk it sits. Here the last elements are
    computed again inside a whole block, so a result depends on the element alone (`codec.batched`)."""
    n = x.numel()
    rest = n % VECTOR_BLOCK
    if not rest or x.requires_grad or torch.jit.is_tracing():
        return fn(x)
    if n <= _PADDED_UP_TO:  # small (a streaming step): one call on a padded copy
        return fn(torch.constant_pad_nd(x.reshape(-1), (0, VECTOR_BLOCK - rest)))[:n].view(x.shape)
    out = fn(x.contiguous())  # large: the last elements again, inside a block
    out.view(-1)[-rest:] = fn(torch.constant_pad_nd(x.reshape(-1)[-rest:], (0, VECTOR_BLOCK - rest)))[:rest]
    return out


_PADDED_UP_TO = 1 << 14  # elements


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0
