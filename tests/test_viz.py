"""Kedro-Viz as a person sees it: a static `kedro viz build` loaded in real headless Chromium.

Chromium comes from Debian's `chromium` package (`make test` installs it when it can); without
it this test is skipped with the reason, and fails in CI (`CI=true`).
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import ROOT, kedro_cli, make_project, require_component

STAGE_NODES = ("generate_tasks_node", "train_student_node", "extract_plans_node", "build_latent_cache_node",
               "train_stage1_node", "train_stage2_node", "train_lora_node", "build_report_node")


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture(scope="module")
def viz_site(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("viz"))
    job = kedro_cli(project, "viz", "build")
    output = job.communicate(timeout=600)[0]
    assert job.returncode == 0, output
    site = project / "build"
    assert (site / "index.html").is_file()
    # The screenshot page switches Kedro-Viz's new-feature hints off (they cover the graph) and opens it.
    (site / "screenshot.html").write_text(
        '<!doctype html><script>localStorage.setItem("KedroViz", JSON.stringify('
        '{showFeatureHints: false, theme: "light"})); location.replace("index.html");</script>')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield project, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def _headless(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1600,1400",
             "--virtual-time-budget=20000", "--hide-scrollbars"]
    return subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=180)


def test_every_dataset_has_a_layer_and_the_layers_follow_the_flow(viz_site):
    import json

    project, _ = viz_site
    graph = json.loads((project / "build" / "api" / "main").read_text())
    # Kedro-Viz drops every layer band (an empty list) when the layers form a cycle.
    assert graph["layers"] == ["raw", "primary", "base_models", "feature", "model_input", "models",
                               "model_output", "reporting"]
    unlayered = [n["name"] for n in graph["nodes"] if n["type"] == "data" and not n.get("layer")]
    assert unlayered == []


def test_kedro_viz_shows_every_stage_in_a_real_browser(viz_site, tmp_path):
    chromium = _chromium()
    require_component(chromium is not None,
                      "Chromium is not installed (Debian package `chromium`; `make test` installs it as root)")
    project, url = viz_site
    dom = _headless(chromium, tmp_path / "profile-dom", "--dump-dom", url).stdout
    missing = [name for name in STAGE_NODES if f">{name}<" not in dom]  # a rendered SVG label
    assert not missing, f"Kedro-Viz did not render {missing}"
    # Kept where a person looks for reports (git-ignored), so the picture can be checked after `make test`.
    screenshot = ROOT / "data" / "08_reporting" / "kedro_viz.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)
    _headless(chromium, tmp_path / "profile-shot", f"--screenshot={screenshot}", url + "screenshot.html")
    assert screenshot.stat().st_size > 20_000  # a rendered page, not a blank one
    if os.environ.get("PILOT_UPDATE_DOCS"):
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(screenshot, ROOT / "docs" / "kedro-viz.png")
