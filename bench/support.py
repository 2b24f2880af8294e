"""What the bench scripts need and the tests share (not shipped in the package): speech-like test audio, a real
recording, the app on a loopback uvicorn server, headless Chromium."""

from __future__ import annotations

import glob
import io
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import uvicorn

from server.protocol import uvicorn_options

REPO = Path(__file__).resolve().parent.parent


def speech_like(seconds: float, sample_rate: int = 16000, seed: int = 0, channels: int = 1) -> np.ndarray:
    """Float32 `[T]` (or `[T, C]`) of harmonic bursts with noise: deterministic, bounded in [-0.5, 0.5]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    x = 0.25 * envelope * voiced + 0.02 * rng.standard_normal(t.shape)
    x = np.clip(x, -0.5, 0.5).astype(np.float32)
    if channels > 1:
        x = np.stack([x * (1 - 0.1 * c) for c in range(channels)], axis=1)
    return x


def audio_bytes(x: np.ndarray, sample_rate: int, format: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sample_rate, format=format, subtype=subtype)
    return buf.getvalue()


def real_recording() -> Path | None:
    """A real speech recording: the repo's examples/speech.wav, else a klettres-data Ogg (Debian package)."""
    example = REPO / "examples" / "speech.wav"
    if example.is_file():
        return example
    found = sorted(glob.glob("/usr/share/klettres/en*/**/*.ogg", recursive=True))
    return Path(found[0]) if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """Run an app on real uvicorn in a thread, on 127.0.0.1:<free port>, with the options `simvq-codec serve`
    gives it for the app's settings (`server.protocol.uvicorn_options`).

    Use as a context manager; `url` and `ws_url` point at it. Leaving stops uvicorn gracefully.
    """

    def __init__(self, app: Any, timeout_graceful_shutdown: int = 10) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=timeout_graceful_shutdown,
            **uvicorn_options(app.state.settings),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


# Headless Chromium on a closed network: without these it keeps trying (and failing) to reach Google's services.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--mute-audio",
    "--window-size=1100,1000",
    "--force-device-scale-factor=1",
    # a fake microphone (a beep) that needs no permission prompt, so the recording path can be driven too
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
)


def chromium_missing() -> str | None:
    """Why headless Chromium cannot be driven here, or None when it can (Debian's chromium and chromium-driver)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for binary, package in (("chromium", "chromium"), ("chromedriver", "chromium-driver")):
        if shutil.which(binary) is None:
            return f"no {binary} on PATH (apt-get install {package}, or `make system-deps` as root)"
    return None


def headless_chromium(user_data_dir: str | Path) -> Any:
    """A selenium Chrome driver on Debian's chromium and chromedriver, with a fresh profile in `user_data_dir`.

    The driver and browser paths are given, so selenium never tries to download either. Call `.quit()`.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
