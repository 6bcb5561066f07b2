"""The widgets as a learner uses them: JupyterLab on localhost, driven in headless Chromium.

Notebook 01: run it, change the prompt in the playground, press **Generate**, and a new
image appears.  Notebook 02: run it, edit a caption in the caption editor, press
**Save captions**, and ``metadata.csv`` changes in that one row and nothing else does.

Needs Debian's chromium (``make browser``) and the dev extra's playwright (its Python
driver; it downloads no browser here: it drives /usr/bin/chromium).  Skipped with a
reason where either is missing.
"""
import csv
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.browser]

if not Path(CHROMIUM).exists():
    pytest.skip("needs Debian's chromium (make browser)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (dev extra)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 over a copy of the notebooks (autosave must not touch ours)."""
    work = tmp_path_factory.mktemp("lab")
    books = work / "notebooks"
    books.mkdir()
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        shutil.copy(nb, books / nb.name)
    home = work / "home"
    port, token = _free_port(), "kolors-course-test"
    env = dict(os.environ, KOLORS_COURSE_HOME=str(home), JUPYTER_RUNTIME_DIR=str(work / "runtime"),
               JUPYTER_CONFIG_DIR=str(work / "config"), JUPYTER_DATA_DIR=str(work / "data"),
               OMP_NUM_THREADS="1")
    env.pop("KOLORS_COURSE_HEADLESS", None)      # a learner's live kernel: widgets are shown
    env["KOLORS_COURSE_CACHE"] = str(ROOT / "cache" / "tiny")   # the tiny models built once
    home.mkdir()
    # every cell rendered (JupyterLab 4 otherwise renders only the visible ones), no news pop-up
    settings = work / "app-settings"
    settings.mkdir()
    (settings / "overrides.json").write_text(json.dumps({
        "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip", "127.0.0.1", "--port", str(port),
         f"--ServerApp.token={token}", f"--ServerApp.root_dir={books}", "--LabApp.expose_app_in_browser=True", f"--LabApp.app_settings_dir={settings}",
         "--ServerApp.disable_check_xsrf=True", "--allow-root"],
        cwd=books, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("JupyterLab did not start:\n" + proc.stdout.read().decode()[-3000:])
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("JupyterLab did not answer within a minute")
    yield {"url": url, "token": token, "home": home}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                                    "--disable-background-networking", "--disable-component-update",
                                    "--disable-sync"])
        yield b
        b.close()


KERNEL_IDLE = """() => { const w = window.jupyterapp.shell.currentWidget;
    const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
    return k && k.status === 'idle'; }"""
ALL_RAN = """() => { const w = window.jupyterapp.shell.currentWidget; const cells = w.content.model.cells;
    let n = 0;
    for (let i = 0; i < cells.length; i++) {
        const c = cells.get(i);
        if (c.type === 'code') { if (!c.executionCount) return false; n++; }
    }
    return n > 0 && w.sessionContext.session.kernel.status === 'idle'; }"""


def _open_and_run(browser, lab, notebook: str):
    """Open the notebook, wait for its kernel, run every cell (Run > Run All Cells), wait for the end."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(120_000)
    # a workspace of its own, reset: JupyterLab would otherwise reopen the previous test's notebook
    page.goto(f"{lab['url']}/lab/workspaces/{Path(notebook).stem}/tree/{notebook}?reset&token={lab['token']}")
    page.wait_for_function("window.jupyterapp && document.querySelector('.jp-Notebook')")
    page.wait_for_function(KERNEL_IDLE)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(ALL_RAN, timeout=600_000)
    errors = page.locator("[data-mime-type='application/vnd.jupyter.error']")
    assert errors.count() == 0, errors.first.inner_text()
    return page


def test_prompt_playground_generates_a_new_image(browser, lab):
    page = _open_and_run(browser, lab, "01_text_to_image.ipynb")
    button = page.get_by_role("button", name="Generate")
    button.scroll_into_view_if_needed()
    playground = page.locator(".widget-vbox", has=button).last
    output = playground.locator(".widget-output")
    assert output.locator("img").count() == 0            # nothing generated before a click
    prompt = playground.locator("textarea").first
    prompt.fill("一个蓝色的正方形，黄色背景")
    button.click()
    output.locator("img").first.wait_for(timeout=120_000)
    first = output.locator("img").first.get_attribute("src")
    prompt.fill("一个红色的圆形，绿色背景，水彩")
    button.click()
    page.wait_for_function("(old) => { const i = [...document.querySelectorAll('.widget-output img')].pop();"
                           " return i && i.src !== old; }", arg=first, timeout=120_000)
    second = output.locator("img").first.get_attribute("src")
    assert first.startswith("data:image/png") and second != first
    page.close()


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def test_caption_editor_saves_one_caption_and_nothing_else(browser, lab):
    page = _open_and_run(browser, lab, "02_dataset.ipynb")
    metas = list(lab["home"].rglob("train/metadata.csv"))
    assert len(metas) == 1, metas
    meta = metas[0]
    dataset = meta.parent.parent
    before_rows = list(csv.DictReader(meta.open(encoding="utf-8")))
    before = _tree(dataset)
    save = page.get_by_role("button", name="Save captions")
    save.scroll_into_view_if_needed()
    editor = page.locator(".widget-vbox", has=save).last
    caption = editor.locator("textarea").first
    caption.fill("几何风，一个被学员改写的标题")
    caption.press("Tab")                                   # the widget syncs its value on change
    save.click()
    editor.locator(".widget-label", has_text="saved 1 caption").wait_for(timeout=30_000)
    after_rows = list(csv.DictReader(meta.open(encoding="utf-8")))
    changed = [(a, b) for a, b in zip(before_rows, after_rows) if a != b]
    assert len(after_rows) == len(before_rows) and len(changed) == 1
    assert changed[0][1]["text"] == "几何风，一个被学员改写的标题"
    assert changed[0][0]["file_name"] == changed[0][1]["file_name"] == before_rows[0]["file_name"]
    after = _tree(dataset)
    assert {k for k in before if before[k] != after.get(k)} == {"train/metadata.csv"}
    assert set(after) == set(before)                        # no stray temporary file left
    page.close()
