"""One streaming-state design for every stateful layer.

A layer that needs memory across chunks subclasses `StreamingModule` and implements
`_init_streaming_state(batch_size)`, returning a small dataclass. `with model.streaming(batch_size):`
creates the state of every such layer in the tree and drops it on exit; outside the context each layer
runs offline, on a whole signal. A stateless container needs nothing: `streaming()` walks all
descendants, so state is passed through to children automatically.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from torch import nn


class StreamingModule(nn.Module):
    """Base class for layers that keep state between streaming calls."""

    def __init__(self) -> None:
        super().__init__()
        self._streaming_state: Any = None

    @property
    def is_streaming(self) -> bool:
        return self._streaming_state is not None

    def _init_streaming_state(self, batch_size: int) -> Any:
        raise NotImplementedError

    @contextmanager
    def streaming(self, batch_size: int = 1) -> Iterator[None]:
        """Run every streaming layer below (and including) this module in streaming mode."""
        layers = [m for m in self.modules() if isinstance(m, StreamingModule)]
        if any(layer.is_streaming for layer in layers):
            raise RuntimeError("already streaming: nested model.streaming() contexts are not supported")
        try:
            for layer in layers:
                layer._streaming_state = layer._init_streaming_state(batch_size)
            yield
        finally:
            for layer in layers:
                layer._streaming_state = None
