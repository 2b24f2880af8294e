"""Real speech for quick runs from the installed Asterisk prompts (Debian `asterisk-core-sounds-*`).

`python -m eval.samples DIR --count 20` writes that many prompts as 16 kHz mono WAV files. Tests do not use
this module: what it finds depends on the machine, so they use the recordings in `examples/` instead.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from eval import SAMPLE_RATE
from training import corpus

ASTERISK_DIR = Path("/usr/share/asterisk/sounds/en")


def asterisk_prompts(min_seconds: float = 2.0, max_seconds: float = 6.0) -> list[Path]:
    """The English G.722 prompts (64 kbit/s, so 8000 bytes/s) whose length is in range, sorted by name."""
    if not ASTERISK_DIR.is_dir():
        return []
    lo, hi = min_seconds * 8000, max_seconds * 8000
    return sorted(p for p in ASTERISK_DIR.glob("*.g722") if lo <= p.stat().st_size <= hi)


def decode_g722(path: Path) -> np.ndarray:
    """A raw G.722 file as 16 kHz mono float32 [T], decoded by ffmpeg (`training.corpus.decode_g722`)."""
    if shutil.which("ffmpeg") is None:
        raise FileNotFoundError("ffmpeg is needed to decode G.722 prompts")
    decoded = corpus.decode_g722([str(path)]).get(str(path))
    if decoded is None:
        raise RuntimeError(f"ffmpeg could not decode {path} as G.722")
    return decoded


def write_prompts(out_dir: Path, count: int, skip: int = 0) -> list[Path]:
    """Write ``count`` Asterisk prompts (after skipping ``skip``) to ``out_dir`` as 16 kHz 16-bit WAV."""
    prompts = asterisk_prompts()[skip : skip + count]
    if not prompts:
        raise FileNotFoundError(f"no Asterisk G.722 prompts under {ASTERISK_DIR}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for p in prompts:
        dst = out_dir / f"{p.stem}.wav"
        sf.write(dst, decode_g722(p), SAMPLE_RATE, subtype="PCM_16")
        written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.samples", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--skip", type=int, default=0, help="skip this many prompts first (sorted by name)")
    args = parser.parse_args(argv)
    try:
        paths = write_prompts(args.out_dir, args.count, args.skip)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} files to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
