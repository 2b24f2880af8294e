"""Benchmark: time from upload to the listening page's players, in headless Chromium against real uvicorn.

    python bench/listen_page.py [--file examples/speech.wav] [--repeats 5] [--screenshot docs/listen-page.png]

Starts the service on loopback with its default settings and the default model, opens `GET /`, uploads the
file `--repeats` times (the first after a warm-up upload) at the page's default bitrates, and prints, from
the page's own clock (file chosen -> ...): when the last bitrate's player could play, and when every
spectrogram was drawn; also the test's wall clock for the latter. `--screenshot` saves the page as a small
palette PNG (for docs/service.md).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository's packages

from bench.support import REPO, LoopbackServer, chromium_missing, headless_chromium  # noqa: E402
from server import Settings, create_app  # noqa: E402


def upload(driver, path: Path, timeout: float = 300) -> tuple[float, float, float]:
    """(players ready, all drawn) on the page's clock and the wall clock of this process, in seconds."""
    driver.execute_script("document.body.dataset.state = ''")
    start = time.monotonic()
    driver.find_element("id", "file").send_keys(str(path))
    while (state := driver.execute_script("return document.body.dataset.state")) not in ("done", "error"):
        if time.monotonic() - start > timeout:
            raise TimeoutError("the page did not finish")
        time.sleep(0.02)
    wall = time.monotonic() - start
    if state == "error":
        raise RuntimeError(driver.execute_script("return document.getElementById('error').textContent"))
    players = driver.execute_script(
        "return Math.max(...[...document.querySelectorAll('section.row[data-playable-s]')]"
        ".map((r) => +r.dataset.playableS))"
    )
    return float(players), float(driver.execute_script("return document.body.dataset.seconds")), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--file", type=Path, default=REPO / "examples" / "speech.wav")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--screenshot", type=Path, help="save the page after the last upload (palette PNG)")
    args = parser.parse_args()
    missing = chromium_missing()
    if missing:
        sys.exit(f"cannot run: {missing}")
    info = sf.info(str(args.file))
    with LoopbackServer(create_app(Settings())) as srv, tempfile.TemporaryDirectory() as profile:
        driver = headless_chromium(profile)
        try:
            driver.get(srv.url + "/")
            while not driver.execute_script("return document.querySelectorAll('#bitrates input:checked').length"):
                time.sleep(0.1)  # the model is loading
            upload(driver, args.file)  # warm-up: the first request of each kind is slower
            runs = [upload(driver, args.file) for _ in range(args.repeats)]
            if args.screenshot:
                from PIL import Image

                chrome = driver.get_window_size()["height"] - driver.execute_script("return innerHeight")
                height = driver.execute_script("return document.documentElement.scrollHeight")
                driver.set_window_size(1000, height + chrome + 40)  # the whole page, footer included
                time.sleep(0.5)
                image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
                image.quantize(colors=48, method=Image.Quantize.MEDIANCUT).save(args.screenshot, optimize=True)
        finally:
            driver.quit()
    print(
        f"{args.file.name}: {info.frames / info.samplerate:.2f} s, {args.repeats} uploads after a warm-up, "
        "default bitrates, default settings"
    )
    print("| measure | median s | min s | max s |\n| --- | --- | --- | --- |")
    for name, values in zip(
        ("players ready (page)", "spectrograms drawn (page)", "spectrograms drawn (wall)"), zip(*runs)
    ):
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")


if __name__ == "__main__":
    main()
