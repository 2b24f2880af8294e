"""The compiled re-phasing (`codec.rephasing`): PyTorch's steps, to rounding, for CPU inference."""

import pytest
import torch

from codec import synthesis
from codec.model import SimVQCodec
from tests.conftest import voice_with_disagreeing_advances


def _both(synth, x):
    """The synthesis of `x` through the compiled steps, and through PyTorch's (gradients on)."""
    compiled = synth(x)
    with torch.enable_grad():
        reference = synth(x.clone().requires_grad_())
    return compiled, reference.detach()


def _snr_db(reference, other) -> float:
    return float(10 * torch.log10(reference.square().sum() / (other - reference).square().sum()))


def test_the_compiled_steps_are_taken_for_inference_only():
    x = torch.zeros(2, 3)
    assert synthesis.runs_compiled(x, x)
    assert not synthesis.runs_compiled(x, x.clone().requires_grad_())
    assert not synthesis.runs_compiled(x, x.double())


@pytest.mark.parametrize("iters", [1, 2])
def test_the_compiled_steps_play_what_pytorchs_play(iters):
    """The same steps with other FFT and cosine kernels: one step agrees to rounding; over two seconds the
    running phases drift a little, far below anything audible."""
    torch.manual_seed(0)
    synth = SimVQCodec(rephase_iters=iters).synthesis
    x, _ = voice_with_disagreeing_advances(synth, seconds=2.0)
    compiled, reference = _both(synth, x[:, :1])
    torch.testing.assert_close(compiled, reference, rtol=0, atol=1e-6 * float(reference.abs().max()))
    compiled, reference = _both(synth, x)
    assert _snr_db(reference, compiled) > 70


def test_a_stream_carries_the_same_running_phase_either_way():
    torch.manual_seed(1)
    synth = SimVQCodec().synthesis
    x, _ = voice_with_disagreeing_advances(synth)
    phases = []
    for grad in (False, True):
        with torch.set_grad_enabled(grad), synth.streaming(1):
            synth(x.clone().requires_grad_(grad))
            phases.append(synth._streaming_state.phase.detach())
    assert phases[0].dtype == torch.float64
    torch.testing.assert_close(phases[0], phases[1], rtol=0, atol=1e-4)


def test_rows_are_played_as_they_would_be_alone():
    torch.manual_seed(2)
    synth = SimVQCodec().synthesis
    x, _ = voice_with_disagreeing_advances(synth, seconds=1.0)
    rows = torch.cat([x[:, start : start + 20] for start in (0, 7, 13)])
    together = synth(rows)
    for row in range(3):
        assert torch.equal(together[row], synth(rows[row : row + 1])[0])


def test_silence_plays_silence():
    synth = SimVQCodec().synthesis
    x = torch.zeros(1, 5 * synth.frames_per_step, 2, synth.bins)
    x[:, :, 0] = float("-inf")  # log magnitudes: every bin silent, its phase undefined
    out = synth(x.reshape(1, 5, synth.in_dim))
    assert torch.equal(out, torch.zeros_like(out))


def test_without_numba_the_steps_are_pytorchs(monkeypatch):
    """A machine without numba (a bare GPU training machine) decodes through PyTorch's steps."""
    torch.manual_seed(3)
    synth = SimVQCodec().synthesis
    x, _ = voice_with_disagreeing_advances(synth)
    _, reference = _both(synth, x)
    calls = []
    pytorchs = synthesis.ISTFTSynthesis._played
    monkeypatch.setattr(synthesis.ISTFTSynthesis, "_played", lambda *args: calls.append(1) or pytorchs(*args))
    monkeypatch.setattr(synthesis, "_compiled_steps", lambda: None)
    fallback = synth(x)
    assert calls
    torch.testing.assert_close(fallback, reference, rtol=0, atol=1e-6 * float(reference.abs().max()))
