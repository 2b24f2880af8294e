"""A released model and its identity: what `load_model` returns, what a token file names, and the one check
that a `.tok` header fits the model."""

from __future__ import annotations

import dataclasses
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
        """The first 8 bytes of the weights' sha256 (a version-2 token header keeps the first 4 of them)."""
        return bytes.fromhex(self.sha256)[:8]

    @property
    def stage_bits(self) -> tuple[int, ...]:
        """Bits per code of each stage, log2 of `model.codebook_sizes`."""
        return self.model.stage_bits

    def header(self, n_stages: int, num_samples: int | None) -> TokHeader:
        """The header of tokens this model makes with `n_stages` stages (`num_samples` None: not known yet)."""
        m = self.model
        frames = None if num_samples is None else -(-num_samples // m.hop_length)
        return TokHeader(
            self.model_id,
            self.weights_hash,
            m.sample_rate,
            m.hop_length,
            n_stages,
            self.stage_bits[:n_stages],
            num_samples,
            frames,
        )

    def check(self, header: TokHeader) -> TokHeader:
        """`header` completed with this model's id and sample rate where the file has none (version 2); a
        TokFormatError naming every difference unless these weights made the codes and can decode them (the one
        check of a token header against a model: the CLI, the API and the server all use it)."""
        m = self.model
        differences = (
            []
            if header.made_with(self.sha256)
            else [f"weights {header.weights_hash.hex()} (model: {self.sha256[: 2 * len(header.weights_hash)]})"]
        )
        differences += [
            f"{name} {got} (model: {want})"
            for name, got, want in (
                ("sample_rate", header.sample_rate, m.sample_rate),
                ("hop_length", header.hop_length, m.hop_length),
            )
            if got is not None and got != want
        ]
        if header.n_stages > m.n_stages:
            differences.append(f"n_stages {header.n_stages} (model has {m.n_stages})")
        elif header.stage_bits != self.stage_bits[: header.n_stages]:
            differences.append(
                f"stage bits {'+'.join(map(str, header.stage_bits))} "
                f"(model: {'+'.join(map(str, self.stage_bits[: header.n_stages]))})"
            )
        if differences:
            made_by = "" if header.model_id is None else f" (made by model {header.model_id!r})"
            raise TokFormatError(
                f"the tokens{made_by} do not fit model {self.model_id!r}: {', '.join(differences)}; "
                "decode them with the model that made them"
            )
        return dataclasses.replace(header, model_id=header.model_id or self.model_id, sample_rate=m.sample_rate)
