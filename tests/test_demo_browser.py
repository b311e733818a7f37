"""The caption search app in a real browser: JupyterLab on 127.0.0.1 serves a small notebook that shows the
app; Debian's Chromium, driven by Playwright (the system executable, no browser download), runs the
notebook, types a caption, waits for the result images and checks their scores, clicks the top result for
its word-level heatmap, then switches the gallery to a folder (test images copied into a plain folder with
broken files among them), checks the re-ranked results and the list of skipped files; screenshots are
saved in the test's temporary folder.

The run is the default smoke baseline (``train_or_load``: trained here only when the registry lacks it, as
notebook 00 does). Skipped only when no Chromium/Chrome executable can be found.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.slow

BROWSERS = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
K = 5
FOLDER_IMAGES = 40


def find_browser() -> str | None:
    """The first Chromium/Chrome executable of ``BROWSERS`` (absolute paths, then names on PATH)."""
    for name in BROWSERS:
        path = name if os.path.isabs(name) else shutil.which(name)
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


@pytest.fixture(scope="module")
def browser_path() -> str:
    path = find_browser()
    if path is None:
        pytest.skip(f"no Chromium or Chrome executable found (looked for {', '.join(BROWSERS)}); "
                    f"install Debian's chromium (apt-get install chromium) to run the browser test")
    return path


@pytest.fixture(scope="module")
def smoke_run():
    """The default smoke baseline run, with its test embeddings cached (so the notebook starts quickly)."""
    from tbps_lib.config import make_config
    from tbps_lib.engine.runs import train_or_load
    from tbps_lib.search import CaptionSearch

    run = train_or_load(make_config("baseline", "smoke", "synthetic:cuhk-like"), progress=False, device="cpu")
    return run, CaptionSearch.from_run(run, "test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_notebook(path: Path, run_dir: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# Caption search (browser test)"),
                nbformat.v4.new_code_cell(f"from tbps_lib.demo import SearchApp\n\n"
                                          f"app = SearchApp.from_run_dirs([{str(run_dir)!r}], k={K}, device='cpu')\n"
                                          f"app")]
    nbformat.write(nb, path)


def _write_lab_settings(user_settings: Path) -> None:
    """Start the notebook's kernel without asking, and never fetch news (no dialog, no network)."""
    settings = {"notebook-extension/tracker": {"autoStartDefaultKernel": True},
                "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}}
    for name, values in settings.items():
        path = user_settings / "@jupyterlab" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def _request(url: str, token: str, method: str = "GET") -> int:
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=5) as response:
        return response.status


@pytest.fixture
def jupyterlab(tmp_path, smoke_run):
    """(base URL, token, notebook name) of a JupyterLab started for this test; stopped afterwards."""
    run, _ = smoke_run
    work, home = tmp_path / "lab", tmp_path / "jupyter"
    work.mkdir()
    _write_notebook(work / "search_demo.ipynb", run.dir)
    _write_lab_settings(home / "config" / "lab" / "user-settings")
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "IPYTHONDIR": str(home / "ipython"),
           "TBPS_PROGRESS": "0", "OMP_NUM_THREADS": "1", "TBPS_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", "--allow-root", "--ServerApp.terminals_enabled=False",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           f"--LabApp.workspaces_dir={home / 'workspaces'}"]
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with {server.returncode}: {(tmp_path / 'jupyterlab.log').read_text()}")
            try:
                if _request(f"{base}/api/status", token) == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within 90 s: {(tmp_path / 'jupyterlab.log').read_text()}")
            time.sleep(0.5)
        yield base, token, "search_demo.ipynb"
    finally:
        try:
            _request(f"{base}/api/shutdown", token, method="POST")
            server.wait(timeout=20)
        except (urllib.error.URLError, ConnectionError, TimeoutError, subprocess.TimeoutExpired):
            pass
        if server.poll() is None:  # the server, its kernel: the process group this fixture started
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_search_in_jupyterlab_with_chromium(browser_path, jupyterlab, smoke_run, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from tbps_lib.search import CaptionSearch

    base, token, notebook = jupyterlab
    run, searcher = smoke_run
    caption = searcher.encoded.captions[0]
    screenshot = tmp_path / "caption_search_demo.png"
    folder_shot = tmp_path / "caption_search_folder.png"
    folder = tmp_path / "my photos"  # a plain folder: no annotations, a space in its name, broken files
    (folder / "more").mkdir(parents=True)
    for i, path in enumerate(searcher.encoded.image_paths[:FOLDER_IMAGES]):
        shutil.copy2(path, (folder / "more" if i % 2 else folder) / Path(path).name)
    (folder / "broken.jpg").write_text("not a picture", encoding="utf-8")
    (folder / "empty.png").write_bytes(b"")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        try:
            # should a kernel dialog still come up, accept the preferred kernel (what a person would do)
            page.add_locator_handler(page.locator(".jp-Dialog"),
                                     lambda dialog: dialog.locator(".jp-mod-accept").click())
            page.goto(f"{base}/lab/tree/{notebook}?token={token}", timeout=120_000)
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=120_000)
            expect(page.locator("#jp-main-statusbar")).to_contain_text("Idle", timeout=120_000)  # kernel ready
            page.locator(".lm-MenuBar-item", has_text="Run").first.click()
            page.locator(".lm-Menu-item").get_by_text("Run All Cells", exact=True).click()
            box = page.locator(".tbps-caption input")
            box.wait_for(timeout=180_000)  # kernel start, imports, the run's model and gallery
            box.fill(caption)
            box.press("Enter")
            images = page.locator(".tbps-result img")
            expect(images).to_have_count(K, timeout=60_000)
            expect(page.locator(".tbps-status")).to_contain_text(f"{K} results in", timeout=30_000)
            page.wait_for_function("() => [...document.querySelectorAll('.tbps-result img')]"
                                   ".every(img => img.complete && img.naturalWidth > 0)", timeout=30_000)
            labels = page.locator(".tbps-result button").all_inner_texts()
            status = page.locator(".tbps-status").inner_text()
            page.locator(".tbps-result button").first.click()  # the word-level heatmap of the top result
            expect(page.locator(".tbps-heatmap img")).to_be_visible(timeout=60_000)
            heatmap = page.locator(".tbps-heatmap").inner_text()
            page.screenshot(path=str(screenshot), full_page=True)
            # the same caption in a folder of images typed by the user
            page.locator(".tbps-gallery-select select").select_option(label="folder")
            path_box = page.locator(".tbps-gallery-path input")
            expect(path_box).to_be_enabled(timeout=30_000)
            path_box.fill(str(folder))
            path_box.press("Enter")
            expect(page.locator(".tbps-skipped")).to_contain_text("Skipped files (2)", timeout=120_000)
            expect(images).to_have_count(K, timeout=60_000)
            page.wait_for_function("() => [...document.querySelectorAll('.tbps-result img')]"
                                   ".every(img => img.complete && img.naturalWidth > 0)", timeout=30_000)
            folder_labels = page.locator(".tbps-result button").all_inner_texts()
            page.locator(".tbps-skipped .lm-AccordionPanel-title, .tbps-skipped .p-Collapse-header, "
                         ".tbps-skipped .jupyter-widget-Collapse-header").first.click()
            expect(page.locator(".tbps-skipped")).to_contain_text("broken.jpg", timeout=30_000)
            skipped = page.locator(".tbps-skipped").inner_text()
            page.screenshot(path=str(folder_shot), full_page=True)
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert [label.split()[0] for label in labels] == [f"#{r}" for r in range(1, K + 1)]
    scores = [float(re.fullmatch(r"#\d+ (-?\d+\.\d{3})", label.strip()).group(1)) for label in labels]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    expected = searcher.search(caption, k=K)  # the same search in this process: the same ranking
    assert scores == pytest.approx(expected["score"].round(3).tolist(), abs=1.5e-3)
    assert f"true person {int(searcher.encoded.query_pids[0])}" in status
    assert "adds to the score of result #1" in heatmap and caption.split()[1].lower() in heatmap.lower()
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
    in_folder = CaptionSearch.from_run(run, gallery=folder).search(caption, k=K)  # cached by the kernel's index
    folder_scores = [float(re.fullmatch(r"#\d+ (-?\d+\.\d{3})", label.strip()).group(1)) for label in folder_labels]
    assert folder_scores == pytest.approx(in_folder["score"].round(3).tolist(), abs=1.5e-3)
    assert "empty.png" in skipped and "not an image" in skipped and "empty file" in skipped
    print(json.dumps({"screenshot": str(screenshot), "folder_screenshot": str(folder_shot), "labels": labels,
                      "status": status, "folder_labels": folder_labels}))
