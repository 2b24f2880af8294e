"""The repository speaks of the product: no paths into one machine, no numbered development periods."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MACHINE_PATH = re.compile(r"(?<![\w.~/${}()-])/(?:work|root|tmp|scratch|mnt|data|Users|home)/")
"""A root folder of one machine's data, runs or scratch space. Not: relative paths (`data/corpus`), URLs
(`host:8000/data/`), variables (`$OUT/tmp/`)."""
DEV_PERIOD = re.compile(r"(?i:\bsessions?[ -]\d+)|\bs\d{1,2}-[a-z]{2}")
"""A numbered work period (the word session, singular or plural, then a number) or a run named after one
(`s`, the number, a hyphen and a name). Describe a run by what it was, and date a change (docs/history.md)."""
PATTERN_FILES = {".gitignore", ".dockerignore"}  # their leading `/` anchors a pattern to the repository


def findings(text: str) -> list[tuple[int, str]]:
    """(line number, the text matched) for every machine path or development-period reference in `text`."""
    return [
        (number, match.group(0))
        for number, line in enumerate(text.splitlines(), 1)
        for pattern in (MACHINE_PATH, DEV_PERIOD)
        for match in pattern.finditer(line)
    ]


def tracked_text_files() -> list[Path]:
    """Every file git tracks that exists and reads as UTF-8 text without NUL bytes."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for name in filter(None, listing.decode().split("\0")):
        path = ROOT / name
        if not path.is_file() or path.name in PATTERN_FILES:
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def test_no_machine_paths_or_development_periods_in_tracked_files():
    files = tracked_text_files()
    assert len(files) > 100 and ROOT / "docs" / "model-card.md" in files
    found = []
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines()
        found += [
            f"{path.relative_to(ROOT)}:{number}: {text!r} in {lines[number - 1].strip()[:100]!r}"
            for number, text in findings("\n".join(lines))
        ]
    assert not found, "machine paths or development-period references:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "line",
    [
        "--out " + "/wo" + "rk/runs/eval",
        "python " + "/tm" + "p/scratch.py",
        "cd " + "/ro" + "ot/corpus",
        "data.train=" + "/da" + "ta/corpus/train.csv",
        "`" + "/ho" + "me/alice/x`",
        "WORKDIR " + "/ho" + "me/simvq",
        "as measured in " + "Sess" + "ion 15",
        "sess" + "ions 17 to 19",
        "the " + "sess" + "ion-5 lineage",
        "`" + "s1" + "4-gan` 3600",
        "`" + "s1" + "2-par2` 6000",
    ],
)
def test_patterns_catch_a_planted_reference(line):
    assert findings(line), line


@pytest.mark.parametrize(
    "line",
    [
        "simvq-codec bundle data/corpus bundle/ --wheels",
        "../data/corpus/dev.csv and runs/eval",
        "http://127.0.0.1:8000/data/x and $OUT/tmp/x and ${HOME}/data/",
        "WORKDIR /srv/simvq",
        "compose: a tmpfs on `/tmp`",
        "aiohttp.ClientSession, an onnxruntime InferenceSession, one WebSocket session per stream",
        "format s16le, 16-bit PCM",
    ],
)
def test_patterns_leave_the_product_alone(line):
    assert not findings(line), findings(line)


def test_no_tracked_symbolic_link_points_outside_the_checkout():
    """A link committed from a development machine (`data -> /somewhere/data`) would send a fresh clone's
    corpus build or runs to a folder of that machine."""
    try:
        listing = subprocess.run(["git", "ls-files", "-s", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    links = [
        entry.split("\t", 1)[1] for entry in filter(None, listing.decode().split("\0")) if entry.startswith("120000")
    ]
    outside = [name for name in links if not (ROOT / name).resolve().is_relative_to(ROOT.resolve())]
    assert not outside, f"tracked links that point outside the checkout: {outside}"
