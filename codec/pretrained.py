"""A released model and its identity: what `load_model` returns, what a token file names, and the one check
that a `.tok` header fits the model."""

from __future__ import annotations

from dataclasses import dataclass

from codec.errors import TokFormatError
from codec.model import SimVQCodec
from codec.tokfile import TokHeader


@dataclass(frozen=True, eq=False)
class Pretrained:
    """A model loaded from a release directory (`codec.checkpoint`), with the identity its files give it.

    Args:
        model: the SimVQCodec, in eval mode.
        model_id: the id written into token files made with it (`config.json`'s `model_id`).
        sha256: hex sha256 of its weights file, verified when it was loaded.
        trained: False for a randomly initialised stand-in (its output is noise).
    """

    model: SimVQCodec
    model_id: str
    sha256: str
    trained: bool

    @property
    def weights_hash(self) -> bytes:
        """The first 8 bytes of the weights' sha256, as token headers carry them."""
        return bytes.fromhex(self.sha256)[:8]

    def header(self, n_stages: int, num_samples: int | None) -> TokHeader:
        """The header of tokens this model makes with `n_stages` stages (`num_samples` None: not known yet)."""
        m = self.model
        frames = None if num_samples is None else -(-num_samples // m.hop_length)
        return TokHeader(self.model_id, self.weights_hash, m.sample_rate, m.hop_length, n_stages, m.bits_per_code,
                         num_samples, frames)

    def layout_mismatch(self, header: TokHeader) -> list[str]:
        """What in `header`'s layout does not fit this model ("sample_rate 8000 (model: 16000)", ...); empty
        when the codes can be decoded by it."""
        m = self.model
        mismatch = [
            f"{name} {got} (model: {want})"
            for name, got, want in (
                ("sample_rate", header.sample_rate, m.sample_rate),
                ("hop_length", header.hop_length, m.hop_length),
                ("bits_per_code", header.bits_per_code, m.bits_per_code),
            )
            if got != want
        ]
        if header.n_stages > m.n_stages:
            mismatch.append(f"n_stages {header.n_stages} (model has {m.n_stages})")
        return mismatch

    def check(self, header: TokHeader, role: str = "the model given") -> None:
        """TokFormatError unless this model made the tokens of `header` (same weights) and their layout fits;
        `role` is how the message names this model ("the installed model" when the file chose it)."""
        if header.weights_hash != self.weights_hash:
            raise TokFormatError(
                f"the file was made by model {header.model_id!r} with weights {header.weights_hash.hex()}, but "
                f"{role} ({self.model_id!r}) has weights {self.sha256[:16]}: decode with the matching model")
        if mismatch := self.layout_mismatch(header):
            raise TokFormatError(f"the file does not fit model {self.model_id!r}: " + ", ".join(mismatch))
