"""The README's Python example runs as printed, on the shipped recording and the bundled model."""

import re
from pathlib import Path

import soundfile as sf

from tests.support import assert_same_tokens

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs_and_streams_the_offline_codes(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 1, "the README's Python section holds one example"
    wav, rate = sf.read(ROOT / "examples" / "speech.wav", dtype="float32")
    sf.write(tmp_path / "speech.wav", wav[: 2 * rate], rate, subtype="PCM_16")  # 2 s keeps it quick
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - the documented example itself
    wav, codes, restored = scope["wav"], scope["codes"], scope["restored"]
    assert codes.shape == (6, -(-len(wav) // 320)) and len(restored) == len(wav)
    assert_same_tokens(scope["streamed"].numpy(), codes, "the offline tokens")
