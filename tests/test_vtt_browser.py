"""The rater's HTML page, end to end in headless Chromium: answer every image with the keyboard, download the CSV,
score it with the key, and compare with scores computed by hand from the answers given.

Chromium is driven over the DevTools protocol on ``--remote-debugging-pipe`` (fds 3 and 4, NUL-separated JSON),
so the test needs no Python package and no browser download: only Debian's ``chromium``
(``apt-get install -y chromium``). Without it the test is skipped.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fidmed.analysis.scoring import GENERATED, REAL, aggregate_scores, score_answers
from fidmed.analysis.vtt import LikertScale, answers_from_pages, load_key, make_vtt

from helpers.images import png_folder

INSTALL = "apt-get update && apt-get install -y chromium"
CHROMIUM = next(
    (
        p
        for p in (
            os.environ.get("FIDMED_CHROMIUM"),
            shutil.which("chromium"),
            shutil.which("chromium-browser"),
            shutil.which("google-chrome"),
        )
        if p
    ),
    None,
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--mute-audio",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
]
KEYCODES = {"Enter": 13, "ArrowLeft": 37, "ArrowRight": 39, "Backspace": 8}


class PipeBrowser:
    """Chromium with a minimal DevTools-protocol client on fds 3 (commands in) and 4 (messages out)."""

    def __init__(self, executable: str, user_data_dir: Path, timeout: float = 30.0) -> None:
        cmd_read, self._cmd_write = os.pipe()
        self._msg_read, msg_write = os.pipe()

        def child_fds() -> None:  # move the pipe ends to 3 and 4 via free high numbers (no clash with 3/4)
            os.dup2(cmd_read, 250)
            os.dup2(msg_write, 251)
            os.dup2(250, 3)
            os.dup2(251, 4)
            os.close(250)
            os.close(251)

        self.proc = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=child_fds,
            close_fds=False,
        )  # fds 3/4 must reach chromium
        os.close(cmd_read)
        os.close(msg_write)
        self.timeout = timeout
        self._next_id = 0
        self._messages: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        self.session: str | None = None

    def _read_loop(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._msg_read, 1 << 16)
            if not chunk:
                self._messages.put(None)
                return
            buffer += chunk
            while b"\0" in buffer:
                message, buffer = buffer.split(b"\0", 1)
                self._messages.put(json.loads(message))

    def send(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._cmd_write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if reply is None:
                raise RuntimeError("chromium closed the DevTools pipe")
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": url}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)[
            "sessionId"
        ]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(expression)

    def press(self, key: str) -> None:
        text = key if len(key) == 1 else ""
        code = KEYCODES.get(key, ord(key.upper()) if len(key) == 1 else 0)
        down = {"type": "keyDown", "key": key, "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code}
        if text:
            down["text"] = text
        self.send("Input.dispatchKeyEvent", down)
        self.send(
            "Input.dispatchKeyEvent",
            {"type": "keyUp", "key": key, "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code},
        )

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_write)


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        pytest.skip(f"needs Chromium: {INSTALL}")
    b = PipeBrowser(CHROMIUM, tmp_path / "profile")
    try:
        yield b
    finally:
        b.close()


def test_page_round_trip_in_headless_chromium(browser, tmp_path):
    real = png_folder(tmp_path / "real", 12, 0)
    models = {"noaug": png_folder(tmp_path / "noaug", 5, 1), "ada": png_folder(tmp_path / "ada", 5, 2)}
    bundle = make_vtt(
        real,
        models,
        tmp_path / "pages",
        raters=["alice"],
        n_real=4,
        n_generated=4,
        seed=3,
        likert=LikertScale(1, 5),
        modality="ct",
    )
    key = load_key(bundle.key_path)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.send("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}, session=False)
    browser.open(bundle.pages["alice"].resolve().as_uri())
    browser.wait_for("document.body && document.body.dataset.ready === '1'")

    order = key["raters"]["alice"]["order"]
    assert browser.evaluate("window.fidmedVTT.items.map(i => i.id)") == order
    # A fixed answer plan: answer by position, rating by position (covers every key of the scale).
    plan = {}
    for position, image_id in enumerate(order):
        answer = REAL if (position * 7) % 3 else GENERATED
        rating = 1 + (position * 3) % 5
        plan[image_id] = (answer, rating)
    # Go back once in the middle: the page must show the earlier image and keep its answer.
    for position, image_id in enumerate(order):
        assert browser.evaluate("window.fidmedVTT.state.index") == position
        assert browser.evaluate("window.fidmedVTT.items[window.fidmedVTT.state.index].id") == image_id
        assert (
            browser.evaluate("document.getElementById('counter').textContent")
            == f"Image {position + 1} of {len(order)}"
        )
        answer, rating = plan[image_id]
        browser.press("r" if answer == REAL else "g")
        assert browser.evaluate("window.fidmedVTT.state.index") == position  # needs the rating too
        browser.press(str(rating))
        if position == 5:
            browser.press("ArrowLeft")
            assert browser.evaluate("window.fidmedVTT.state.index") == 5
            browser.press("Enter")
    assert browser.evaluate("window.fidmedVTT.nAnswered()") == len(order)
    answered = browser.evaluate("document.getElementById('answered').textContent")
    assert answered == f"{len(order)} of {len(order)} answered"
    assert browser.evaluate("document.getElementById('done').hidden") is False
    assert browser.evaluate("document.getElementById('progress-bar').style.width") == "100%"
    # Keys outside the scale are ignored.
    browser.press("9")
    browser.press("d")
    deadline = time.monotonic() + 20
    files: list[Path] = []
    while time.monotonic() < deadline:
        files = [p for p in downloads.iterdir() if p.suffix == ".csv"]
        if files:
            break
        time.sleep(0.1)
    assert len(files) == 1, list(downloads.iterdir())
    assert files[0].name == f"vtt-answers-{key['test_id']}-alice.csv"

    answers = answers_from_pages(files, key)
    assert {a.image_id: (a.answer, int(a.rating)) for a in answers} == plan
    scores = score_answers(answers)
    # Independent hand count from the plan and the key's truths.
    for s in scores:
        ids = key["models"][s.model]["images"]
        real_ids = [i for i in ids if key["images"][i]["truth"] == REAL]
        gen_ids = [i for i in ids if key["images"][i]["truth"] == GENERATED]
        tp = sum(plan[i][0] == REAL for i in real_ids)
        fp = sum(plan[i][0] == REAL for i in gen_ids)
        assert (s.tp, s.fp, s.fn, s.tn) == (tp, fp, len(real_ids) - tp, len(gen_ids) - fp)
        assert s.diff == pytest.approx(
            np.mean([plan[i][1] for i in real_ids]) - np.mean([plan[i][1] for i in gen_ids]), abs=1e-12
        )
    assert {a["model"] for a in aggregate_scores(scores)} == {"noaug", "ada"}


VIEWPORTS = [(1280, 900), (1366, 768), (1920, 1080)]
CONTROLS = ["#btn-real", "#btn-generated", "#likert button", "#btn-prev", "#btn-next", "#btn-download", "#btn-help"]


def _layout(browser: PipeBrowser) -> dict:
    """Bounding boxes of the image and every rating control, the viewport and the scrollable height."""
    return browser.evaluate(
        """(() => {
        const box = (el) => { const r = el.getBoundingClientRect();
                              return {left: r.left, top: r.top, right: r.right, bottom: r.bottom}; };
        const img = document.getElementById('image');
        const controls = [];
        for (const sel of %s) for (const el of document.querySelectorAll(sel)) controls.push([sel, box(el)]);
        return {width: window.innerWidth, height: window.innerHeight,
                scroll_height: document.scrollingElement.scrollHeight, scroll_width: document.scrollingElement.scrollWidth,
                image: box(img), natural: [img.naturalWidth, img.naturalHeight], controls};
    })()"""
        % json.dumps(CONTROLS)
    )


@pytest.mark.parametrize("help_shown", [True, False])
def test_image_and_rating_controls_fit_one_screen(browser, tmp_path, help_shown):
    """A rater never scrolls: at common screen sizes the image, real/generated and every rating button are inside
    the viewport, with the help shown (as on arrival) or hidden (H), and the image takes most of the height left."""
    real = png_folder(tmp_path / "real", 4, 0, size=512)
    bundle = make_vtt(
        real,
        {"ada": png_folder(tmp_path / "ada", 2, 1, size=512)},
        tmp_path / "pages",
        raters=["bob"],
        n_real=2,
        n_generated=2,
        seed=0,
        modality="ct",
        likert=LikertScale(1, 5, ("surely generated", "probably generated", "unsure", "probably real", "surely real")),
    )
    browser.open(bundle.pages["bob"].resolve().as_uri())
    browser.wait_for(
        "document.body && document.body.dataset.ready === '1' && document.getElementById('image').complete"
    )
    if not help_shown:
        browser.press("h")
        assert browser.evaluate("document.getElementById('help').hidden") is True
    for width, height in VIEWPORTS:
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        lay = _layout(browser)
        assert (lay["width"], lay["height"]) == (width, height)
        assert lay["scroll_height"] <= height and lay["scroll_width"] <= width, lay  # nothing below the fold
        assert len(lay["controls"]) == 2 + 5 + 4
        for sel, b in lay["controls"] + [("#image", lay["image"])]:
            assert 0 <= b["left"] < b["right"] <= width and 0 <= b["top"] < b["bottom"] <= height, (
                width,
                height,
                sel,
                b,
            )
        # the square image as drawn (object-fit: contain): the smaller side of its box
        drawn = min(lay["image"]["right"] - lay["image"]["left"], lay["image"]["bottom"] - lay["image"]["top"])
        assert drawn >= (0.3 if help_shown else 0.5) * height, (width, height, lay["image"])
