"""eval.lowrate_oracle: residual codebooks drawn from a model's latents over groups of frames."""

import argparse

import pytest
import soundfile as sf
import torch

from eval import lowrate_oracle
from codec.quantizer import principal_directions
from eval.lowrate_oracle import Arm, drawn_residual_quantizer, grouped, nearest
from tests.conftest import speechlike
from tests.support import make_tiny_model


def test_an_arm_reads_group_codes_and_stages_and_says_its_bits():
    arm = Arm.parse("2x8192x4")
    assert (arm.group, arm.codes, arm.stages) == (2, 8192, 4)
    assert arm.bits_per_frame(4) == 26.0 and str(arm) == "2x8192x4" and arm.search_dims is None
    assert Arm.parse("1x16384x2@16") == Arm(1, 16384, 2, 16) and str(Arm(1, 16384, 2, 16)) == "1x16384x2@16"
    for bad in ("2x8192", "2xlotsx4", "0x8192x4", "1x64x2@0", "1x64x2@x"):
        with pytest.raises(argparse.ArgumentTypeError):
            Arm.parse(bad)


def test_grouped_puts_consecutive_frames_side_by_side_and_drops_an_incomplete_group():
    latents = torch.arange(10.0).reshape(5, 2)
    assert grouped(latents, 2).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert torch.equal(grouped(latents, 1), latents)


def test_nearest_finds_each_rows_closest_code():
    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.tensor([[9.0, 1.0], [1.0, 1.0], [1.0, 8.0], [11.0, -1.0], [-1.0, 0.0]])
    assert nearest(x, codes).tolist() == [1, 0, 2, 1, 0]


def test_a_search_in_the_principal_directions_ignores_the_others():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=generator) * torch.tensor([5.0, 1.0, 0.01])
    _, basis = principal_directions(x, 2)
    assert basis.shape == (3, 2) and basis[2].abs().max() < 1e-2  # the weakest axis is left out
    codes = torch.tensor([[0.0, 0.0, 9.0], [1.0, 0.0, -9.0]])
    point = torch.tensor([[0.9, 0.0, 9.0]])
    assert nearest(point, codes).item() == 0 and nearest(point, codes, basis).item() == 1


def test_codes_drawn_from_every_training_vector_reproduce_those_vectors_at_the_first_stage():
    train = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    stages = drawn_residual_quantizer(train, [train[:12]], Arm(group=2, codes=20, stages=2))
    assert len(stages) == 2 and stages[0][0].shape == (12, 4)
    assert torch.allclose(stages[0][0], train[:12])  # every pair of frames is one of the codes
    with pytest.raises(ValueError, match="cannot give 64 codes"):
        drawn_residual_quantizer(train, [train], Arm(group=2, codes=64, stages=1))


def test_the_cli_prints_the_models_own_rows_and_each_arms_rows(tmp_path, capsys):
    make_tiny_model(tmp_path / "model")
    rows = ["path,speaker,duration"]
    for i in range(4):
        sf.write(tmp_path / f"a{i}.wav", speechlike(1.0, seed=i), 16000)
        rows.append(f"a{i}.wav,s{i % 2},1.0")
    (tmp_path / "files.csv").write_text("\n".join(rows) + "\n")
    manifest = str(tmp_path / "files.csv")
    argv = [manifest, manifest, "--model", str(tmp_path / "model"), "--arms", "1x16x2", "2x16x1"]
    assert lowrate_oracle.main([*argv, "--train-files", "2", "--per-speaker", "1"]) == 0
    printed = capsys.readouterr().out
    assert "2 dev files" in printed
    names = [line.split(" | ")[0].lstrip("| ") for line in printed.splitlines() if line.startswith("| ")][2:]
    assert names == [
        "unquantized",
        "the model's, 1 stage(s)",
        "the model's, 2 stage(s)",
        "drawn 1 x 16, 1 stage(s)",
        "drawn 1 x 16, 2 stage(s)",
        "drawn 2 x 16, 1 stage(s)",
    ]
