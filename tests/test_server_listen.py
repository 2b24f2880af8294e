"""The listening page (GET /): served self-contained, and driven in headless Chromium against real uvicorn."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from codec.tokfile import read_tok
from server import Settings, create_app
from tests.support import (
    REPO,
    LoopbackServer,
    audio_bytes,
    chromium_missing,
    headless_chromium,
    make_tiny_model,
    wait_ready,
)

MAX_DURATION_S = 30
DONE = ("done", "error")


def test_page_is_served_self_contained(tmp_path):
    model = make_tiny_model(tmp_path / "tiny")
    app = create_app(Settings(warmup=False, load_in_background=False, max_duration_s=12.5), models={"tiny-test": model})
    with TestClient(app) as client:
        r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert 'data-max-duration-s="12.5"' in page  # the service's own limit stops a recording
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page must load nothing from elsewhere"
    policy = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self' blob:"
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert policy["script-src"] == f"'sha256-{digest}'"  # only this inline script runs
    for call in ('fetch("/v1/models")', "post(`/encode?", "post(`/decode?"):  # the real API, nothing else
        assert call in script
    assert "/" not in app.openapi()["paths"]


# --- in a real browser -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """The default model on uvicorn (loopback) and a headless Chromium with a fresh profile."""
    missing = chromium_missing()
    if missing:
        pytest.skip(f"no browser test: {missing}")
    settings = Settings(pool_size=2, max_duration_s=MAX_DURATION_S, request_timeout_s=60)
    with LoopbackServer(create_app(settings)) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        wait_ready(client)
        driver = headless_chromium(tmp_path_factory.mktemp("chromium-profile"))
        try:
            yield srv, client, driver
        finally:
            driver.quit()


def open_page(driver, url: str) -> None:
    driver.get(url + "/")
    wait_for(driver, "return document.querySelectorAll('#bitrates input').length > 0", 120)  # models loaded


def wait_for(driver, script: str, timeout: float):
    deadline = time.monotonic() + timeout
    while not (value := driver.execute_script(script)):
        assert time.monotonic() < deadline, f"timed out waiting for: {script}"
        time.sleep(0.05)
    return value


def finish(driver, timeout: float = 240) -> str:
    return wait_for(driver, f"const s = document.body.dataset.state; return {list(DONE)}.includes(s) && s", timeout)


ROWS = """return [...document.querySelectorAll('section.row')].map((row) => {
  const audio = row.querySelector('audio'), tok = row.querySelector('a[download$=".tok"]');
  return {title: row.querySelector('b').textContent, bytes: row.querySelector('.bytes')?.textContent,
          size: row.querySelector('.size')?.textContent, tok: tok && tok.href, src: audio.currentSrc,
          duration: audio.duration, ready: audio.readyState, error: audio.error && audio.error.code,
          playable: audio.canPlayType('audio/wav'), playableS: row.dataset.playableS};
});"""

FETCH_BLOB = """const done = arguments[arguments.length - 1];
fetch(arguments[0]).then((r) => r.arrayBuffer()).then((b) => {
  let s = ''; new Uint8Array(b).forEach((x) => { s += String.fromCharCode(x); }); done(btoa(s));
}, (e) => done('error: ' + e));"""


def spectrogram_pixels(driver, png: bytes) -> list[np.ndarray]:
    """Each row's spectrogram as it appears in the screenshot: an [H, W] luminance crop."""
    from PIL import Image

    shot = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    rects = driver.execute_script(
        "const k = window.devicePixelRatio; return [...document.querySelectorAll('section.row canvas')].map((c) => {"
        " const r = c.getBoundingClientRect(); return [r.left * k, r.top * k, r.right * k, r.bottom * k]; });"
    )
    crops = []
    for left, top, right, bottom in rects:
        assert bottom <= shot.shape[0] and right <= shot.shape[1], "a spectrogram is outside the screenshot"
        crops.append(shot[int(top) + 1 : int(bottom) - 1, int(left) + 1 : int(right) - 1])
    return crops


def test_upload_gives_a_player_per_bitrate(browser, tmp_path):
    srv, client, driver = browser
    wav = REPO / "examples" / "speech.wav"
    if not wav.is_file():
        pytest.skip("examples/speech.wav is missing")
    seconds = sf.info(str(wav)).frames / sf.info(str(wav)).samplerate
    info = client.get("/v1/models").json()["models"][0]

    open_page(driver, srv.url)
    checked = driver.execute_script(
        "return [...document.querySelectorAll('#bitrates input:checked')].map(x => +x.value)"
    )
    nearest = [1 + int(np.argmin(np.abs(np.array(info["bitrates_kbps"]) - k))) for k in (1.5, 3, 6)]
    assert checked == nearest  # default: about 1.5, 3 and 6 kbit/s
    assert driver.execute_script("return document.getElementById('record').textContent") == "Record"

    start = time.monotonic()
    driver.find_element("id", "file").send_keys(str(wav))
    assert finish(driver) == "done", driver.execute_script("return document.getElementById('error').textContent")
    wall = time.monotonic() - start
    rows = driver.execute_script(ROWS)
    page_s = float(driver.execute_script("return document.body.dataset.seconds"))
    players_s = max(float(r["playableS"]) for r in rows[1:])
    print(
        f"\n{seconds:.2f} s upload: {len(checked)} players {players_s:.2f} s, all drawn {page_s:.2f} s "
        f"(page clock), {wall:.2f} s (test clock)"
    )

    assert rows[0]["title"] == "original: speech.wav" and len(rows) == 1 + len(checked)
    for row in rows:  # every player has a playable WAV source of the upload's duration
        assert row["src"].startswith("blob:") and row["error"] is None and row["ready"] >= 1, row
        assert row["playable"] in ("maybe", "probably") and row["duration"] == pytest.approx(seconds, abs=1e-3)
    for row, stages in zip(rows[1:], checked):
        shown = int(row["bytes"])
        tok = base64.b64decode(driver.execute_async_script(FETCH_BLOB, row["tok"]))  # the page's download
        assert shown == len(tok), row  # the size shown is the .tok's bytes
        direct = client.post(f"/encode?stages={stages}", files={"file": ("speech.wav", wav.read_bytes())})
        assert tok == direct.content  # the same file POST /encode gives
        header, _ = read_tok(io.BytesIO(tok))
        assert header.n_stages == stages
        kbps = float(re.search(r"([\d.]+) kbit/s actual", row["size"]).group(1))
        assert kbps == pytest.approx(len(tok) * 8 / seconds / 1000, abs=0.006)

    origins = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith((srv.url + "/", "blob:", "data:")) for u in origins), origins

    png = driver.get_screenshot_as_png()
    (tmp_path / "listen.png").write_bytes(png)
    crops = spectrogram_pixels(driver, png)
    assert len(crops) == len(rows)
    for row, crop in zip(rows, crops):  # drawn: varied, with a good share of lit pixels (not one blank colour)
        lit = float((crop > 40).mean())
        assert crop.size > 50 * 200 and crop.std() > 20 and 0.1 < lit < 0.99, (row["title"], crop.std(), lit)


def problem_text(r: httpx.Response) -> str:
    p = r.json()
    assert r.headers["content-type"] == "application/problem+json"
    return f"{p['title']} ({p['status']}): {p['detail']}"


@pytest.mark.parametrize("case", ["not-audio", "too-long"])
def test_a_refusal_shows_the_services_problem(browser, tmp_path, case):
    srv, client, driver = browser
    if case == "not-audio":
        path, body = tmp_path / "notes.wav", b"these are not the samples you are looking for\n" * 20
    else:
        path, body = tmp_path / "long.wav", audio_bytes(np.zeros(16000 * (MAX_DURATION_S + 1), np.float32), 16000)
    path.write_bytes(body)
    expected = client.post("/encode?stages=1", files={"file": (path.name, body)})
    assert expected.status_code in ((415, 422) if case == "not-audio" else (413,)), expected.text

    open_page(driver, srv.url)
    driver.find_element("id", "file").send_keys(str(path))
    assert finish(driver) == "error"
    assert driver.execute_script("return document.getElementById('error').textContent") == problem_text(expected)
    assert driver.execute_script("return document.querySelectorAll('section.row').length") == 0


def test_microphone_recording_is_encoded(browser):
    """Chromium's fake microphone (a beep) stands in for a voice: record, stop, hear it at each bitrate."""
    srv, _, driver = browser
    open_page(driver, srv.url)
    record = driver.find_element("id", "record")
    record.click()
    wait_for(driver, "return document.getElementById('record').textContent === 'Stop'", 30)
    time.sleep(1.5)
    record.click()
    assert finish(driver) == "done", driver.execute_script("return document.getElementById('error').textContent")
    rows = driver.execute_script(ROWS)
    assert len(rows) == 4 and 1.0 < rows[0]["duration"] < 10
    for row in rows:
        assert row["error"] is None and row["duration"] == pytest.approx(rows[0]["duration"], abs=1e-3)
