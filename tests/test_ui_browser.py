"""`vlrt ui` driven in headless chromium as a user would: preview sweep, render, stop and resume,
bad settings. The page's renders are compared with `vlrt render` run on the command line.

Needs Debian's chromium and chromedriver (`.ci/run` installs them). Set VLRT_UI_SCREENSHOT=PATH to
keep the page's screenshot (the README's picture is made this way).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import fields
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from vlrt.settings.config import Settings

pytestmark = pytest.mark.browser
webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("gradio")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)

FRAMES = 12
# The settings the page is given, as the command line writes them (the grid click sets the last two).
CLI_SETTINGS = ["--model", "demo", "--loop-n", "2", "--steps", "2", "--denoising-strength", "0.5", "--lossless",
                "--superimpose-alpha", "0.6", "--seed", "2"]


def vlrt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlrt", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def decoded(path: Path) -> tuple[list[np.ndarray], float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)], float(stream.average_rate)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    from vlrt.demo.clip import write_sample_clip

    folder = tmp_path_factory.mktemp("ui")
    write_sample_clip(folder / "clip.mp4", frames=FRAMES, fps=12, audio=False)
    return folder


@pytest.fixture(scope="module")
def page(work: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "-m", "vlrt", "ui", "--port", str(port)], cwd=work, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "vlrt ui did not start"
                time.sleep(0.5)
        driver.get(f"http://127.0.0.1:{port}")
        wait_for(lambda: driver.find_elements(By.ID, "render"), 60)
        for group in driver.find_elements(By.CSS_SELECTOR, "[id^=group-]"):  # open the closed accordions
            if not group.find_elements(By.CSS_SELECTOR, "[id^=setting-]"):
                group.find_element(By.TAG_NAME, "button").click()
                wait_for(lambda g=group: g.find_elements(By.CSS_SELECTOR, "[id^=setting-]"), 30)
        yield driver
    finally:
        driver.quit()
        server.terminate()
        server.wait(30)


def wait_for(condition, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s")


def box(driver, elem_id: str):
    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")


def type_into(driver, elem_id: str, text: str) -> None:
    element = box(driver, elem_id)
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(text if text else Keys.BACKSPACE)
    element.send_keys(Keys.TAB)  # blur: Gradio takes the value


def value(driver, elem_id: str) -> str:
    return box(driver, elem_id).get_property("value")


def click(driver, elem_id: str) -> None:
    driver.find_element(By.ID, elem_id).click()


def message_after(driver, elem_id: str) -> str:
    """Click a button and return the page's next message."""
    driver.execute_script("arguments[0].value = ''", box(driver, "message"))
    click(driver, elem_id)
    return wait_for(lambda: value(driver, "message"), 120)


def tab(driver, name: str) -> None:
    driver.find_element(By.XPATH, f"//button[@role='tab'][normalize-space()='{name}']").click()


def test_every_setting_is_in_the_page(page) -> None:
    shown = {e.get_attribute("id") for e in page.find_elements(By.CSS_SELECTOR, "[id^=setting-]")}
    assert shown == {f"setting-{f.name}" for f in fields(Settings)}


def test_the_page_serves_no_file_it_was_not_given(page, work: Path) -> None:
    base = page.current_url.rstrip("/")
    for path in ("/etc/passwd", str(work / "clip.mp4")):  # a system file, and one in the server's folder
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/gradio_api/file={path}", timeout=30)
        assert refused.value.code == 403  # the route exists (an unknown one is 404) and refuses


def test_bad_settings_show_the_command_lines_message_and_start_nothing(page, work: Path) -> None:
    type_into(page, "input", str(work / "clip.mp4"))
    type_into(page, "output", str(work / "bad.mkv"))
    type_into(page, "setting-model", "demo")
    for name, text in (("temporal_superimpose_alpha_list", "0.5,0.5"),
                       ("prompt_schedule", "__import__('os').system('touch pwned')")):
        cli = vlrt("render", "clip.mp4", "-o", "bad.mkv", "--model", "demo", f"--{name.replace('_', '-')}", text, cwd=work)
        assert cli.returncode != 0
        type_into(page, f"setting-{name}", text)
        assert message_after(page, "render") == cli.stderr.strip().splitlines()[-1]
        type_into(page, f"setting-{name}", "1" if name.startswith("temporal") else "")
    assert not (work / "pwned").exists()
    assert not list(work.glob("*bad.mkv*"))


def test_preview_sweep_grid_and_a_click_copies_the_cell_into_the_panel(page, work: Path) -> None:
    type_into(page, "input", str(work / "clip.mp4"))
    type_into(page, "setting-model", "demo")
    for name, text in (("loop_n", "2"), ("steps", "2"), ("denoising_strength", "0.5")):
        type_into(page, f"setting-{name}", text)
    tab(page, "Preview")
    type_into(page, "preview-frames", "0,5")
    type_into(page, "preview-sweeps", "superimpose_alpha=0.2,0.6\nseed=1,2")
    click(page, "preview")
    grid = wait_for(lambda: page.find_elements(By.CSS_SELECTOR, "#grid img"), 300)[0]
    wait_for(lambda: grid.get_property("naturalHeight"))
    # 2 × 2 settings, one row each, two frames: 96-pixel rows under a 14-pixel header, 2-pixel gaps.
    assert grid.get_property("naturalHeight") == 14 + 4 * (96 + 2)
    assert value(page, "setting-superimpose_alpha") == "0.25"
    # The last row is superimpose_alpha=0.6, seed=2.
    shown_height = grid.size["height"]
    ActionChains(page).move_to_element_with_offset(grid, 0, int(shown_height * 0.4)).click().perform()
    wait_for(lambda: value(page, "setting-superimpose_alpha") == "0.6")
    assert value(page, "setting-seed") == "2"


def test_render_matches_the_command_line_and_a_stopped_render_resumes(page, work: Path) -> None:
    reference = vlrt("render", "clip.mp4", "-o", "ref.mkv", *CLI_SETTINGS, cwd=work)
    assert reference.returncode == 0, reference.stderr
    expected, expected_fps = decoded(work / "ref.mkv")
    assert len(expected) == FRAMES

    tab(page, "Render")
    page.find_element(By.CSS_SELECTOR, "#setting-lossless input").click()
    type_into(page, "output", str(work / "out.mkv"))
    assert message_after(page, "render").startswith("vlrt render")
    wait_for(lambda: value(page, "message") in ("finished",) or value(page, "message").startswith("vlrt: error"), 400)
    assert value(page, "message") == "finished"
    assert re.match(rf"{FRAMES}/{FRAMES} frames · per pass L1:{FRAMES} L2:{FRAMES}", value(page, "progress"))
    frames, fps = decoded(work / "out.mkv")
    assert fps == expected_fps == 12
    assert len(frames) == FRAMES and all(np.array_equal(a, b) for a, b in zip(frames, expected))
    video = wait_for(lambda: page.find_elements(By.CSS_SELECTOR, "#video video[src]"), 30)[0]
    # Served through the route that refuses every other file (Gradio may have made a playable mp4 of it).
    assert "/gradio_api/file=" in video.get_attribute("src")
    with urllib.request.urlopen(video.get_attribute("src"), timeout=30) as served:
        assert served.status == 200 and len(served.read()) > 0
    assert page.find_elements(By.CSS_SELECTOR, "#plot img")
    assert len(page.find_elements(By.CSS_SELECTOR, "#input-frame img, #output-frame img")) == 2
    if os.environ.get("VLRT_UI_SCREENSHOT"):
        page.save_screenshot(os.environ["VLRT_UI_SCREENSHOT"])

    folder = work / "stopped"
    type_into(page, "output", f"{folder}/")
    message_after(page, "render")
    wait_for(lambda: re.match(r"([2-9]|1[01])/", value(page, "progress")), 400)
    assert message_after(page, "stop").startswith("stopping")
    wait_for(lambda: value(page, "message").startswith("stopped"), 120)
    kept = len(list(folder.glob("*.png")))
    assert 0 < kept < FRAMES
    message_after(page, "resume")
    wait_for(lambda: value(page, "message") == "finished", 400)
    pictures = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
    assert len(pictures) == FRAMES and all(np.array_equal(a, b) for a, b in zip(pictures, expected))
