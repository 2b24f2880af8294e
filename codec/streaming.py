"""One streaming-state design for every stateful layer, with each stream's state a value its caller owns.

A layer that needs memory across chunks subclasses `StreamingModule` and implements
`_init_streaming_state(batch_size)`, returning a small dataclass whose fields are all tensors.
`model.init_streaming_state(batch_size)` creates the state of every such layer in the tree as one
`StreamingState`, which the caller keeps; `with model.streaming(state):` makes it the active state of the
current thread (or asyncio task) and each layer reads and updates its own entry while it is active. So one
model serves any number of streams, interleaved or from several threads at once, each with its own state;
outside the context each layer runs offline, on a whole signal. A stateless container needs nothing: the
state covers all descendants, so streaming passes through to children automatically.

A state flattens to named tensors (`tensors()`: `"<layer name>.<field>" -> Tensor`, the layer's name in
the model's `named_modules()`) and loads them back (`load_tensors`), for exports with explicit state inputs.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

from torch import Tensor, nn

_ACTIVE: ContextVar[StreamingState | None] = ContextVar("simvq_streaming_state", default=None)


class StreamingState:
    """The streaming state of one stream through one model: every stateful layer's state, by layer name.

    Running a chunk inside `model.streaming(state)` updates the state in place; `clone()` snapshots it
    (continuing from the copy gives what continuing from the original would).
    """

    def __init__(self, model: nn.Module, layers: dict[str, Any], batch_size: int) -> None:
        self.model, self.layers, self.batch_size = model, layers, batch_size
        named = dict(model.named_modules())
        self._by_module = {named[name]: state for name, state in layers.items()}

    def of(self, layer: nn.Module) -> Any:
        """`layer`'s state in this stream (None if the layer is not part of the model)."""
        return self._by_module.get(layer)

    def clone(self) -> StreamingState:
        """An independent copy (tensors cloned)."""
        layers = {
            name: dataclasses.replace(
                state, **{f.name: getattr(state, f.name).clone() for f in dataclasses.fields(state)}
            )
            for name, state in self.layers.items()
        }
        return StreamingState(self.model, layers, self.batch_size)

    def tensors(self) -> dict[str, Tensor]:
        """Every field of every layer's state as `"<layer name>.<field>" -> Tensor` (the root's fields unprefixed)."""
        out = {}
        for name, state in self.layers.items():
            for f in dataclasses.fields(state):
                out[f"{name}.{f.name}" if name else f.name] = getattr(state, f.name)
        return out

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Replace the state's tensors by `tensors`, which must name exactly the fields `tensors()` lists."""
        expected = self.tensors()
        if set(tensors) != set(expected):
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise ValueError(f"state tensors do not fit the model: missing {missing}, unexpected {extra}")
        for name, state in self.layers.items():
            for f in dataclasses.fields(state):
                setattr(state, f.name, tensors[f"{name}.{f.name}" if name else f.name])


class StreamingModule(nn.Module):
    """Base class for layers that keep state between streaming calls."""

    @property
    def _streaming_state(self) -> Any:
        """This layer's state in the active stream, or None when running offline."""
        active = _ACTIVE.get()
        return None if active is None else active.of(self)

    @property
    def is_streaming(self) -> bool:
        return self._streaming_state is not None

    def _init_streaming_state(self, batch_size: int) -> Any:
        raise NotImplementedError

    def init_streaming_state(self, batch_size: int = 1) -> StreamingState:
        """A fresh state for one stream of `batch_size` items through this module and its descendants."""
        layers = {
            name: m._init_streaming_state(batch_size)
            for name, m in self.named_modules()
            if isinstance(m, StreamingModule)
        }
        return StreamingState(self, layers, batch_size)

    @contextmanager
    def streaming(self, state: StreamingState | int = 1) -> Iterator[StreamingState]:
        """Run the streaming layers below (and including) this module on `state` (a batch size: a fresh state).

        The state is active in the current thread or asyncio task only, so streams on one model do not
        interfere; contexts do not nest."""
        if isinstance(state, int):
            state = self.init_streaming_state(state)
        elif state.model is not self:
            raise ValueError("this streaming state belongs to another model")
        if _ACTIVE.get() is not None:
            raise RuntimeError("already streaming: nested model.streaming() contexts are not supported")
        token = _ACTIVE.set(state)
        try:
            yield state
        finally:
            _ACTIVE.reset(token)
