"""The HTML report as a browser shows it: headless Chromium renders ``report.html`` to a
screenshot (which must not be blank) and to its DOM (which must hold every arm and the tables).

Needs a Chromium on PATH (Debian: ``apt-get install chromium``); skipped otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from helpers.report_frames import ARMS, REF, make_frames
from varshift.lab.report import ReportContext, build_report

BROWSER = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                if (path := shutil.which(name))), None)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(BROWSER is None, reason="no headless Chromium on PATH "
                       "(apt-get install chromium)"),
]


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert BROWSER is not None
    # --no-sandbox: CI runs as root, where Chromium refuses its sandbox; the D-Bus complaints
    # it prints on stderr are harmless.
    return subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,900", *args],
        capture_output=True, text=True, timeout=60, check=True,
    )


@dataclass(frozen=True)
class Rendered:
    screenshot: Path
    dom: str


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    out = tmp_path_factory.mktemp("browser")
    context = ReportContext(preset="quick", reference=REF)
    page = build_report(make_frames(), "placement", out, context=context).html
    shot = out / "shot.png"
    # One browser start for both (about 1.5 s each): the screenshot and the DOM.
    dom = chromium(f"--screenshot={shot}", "--dump-dom", page.as_uri()).stdout
    return Rendered(shot, dom)


def test_screenshot_is_not_blank(rendered: Rendered) -> None:
    pixels = mpimg.imread(rendered.screenshot)[..., :3]
    assert pixels.shape[:2] == (900, 1200)
    # A blank page is one colour; text, table shading and the warning box give many.
    assert float(pixels.var()) > 0.005
    colours = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50


def test_dom_has_every_arm_and_the_tables(rendered: Rendered) -> None:
    dom = rendered.dom
    assert "<table>" in dom
    assert dom.count("<img") == 3
    for arm in ARMS:
        assert arm in dom
    assert "Study report: placement" in dom
