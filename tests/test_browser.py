"""A real browser (Debian's headless Chromium, driven by Playwright) on the live dashboard.

A gd reconstruction runs on a 2-worker LocalCluster in a background thread; the
browser opens ``/daskptycho`` and checks, through BokehJS's document, that the
page shows a phase image and a cost curve that grows, and that the task-stream
page ``/tasks`` shows the gradient and pass tasks. The run is stopped once the
browser has seen what it needs. A screenshot goes to ``$DASKPTYCHO_SCREENSHOT``
(a folder, e.g. ``docs/``) when that is set, else to the test's tmp folder.
"""

from __future__ import annotations

import os
import threading

import dask
import numpy as np
import pytest

import daskptycho as dp
import daskptycho.dashboard  # noqa: F401  (the page is there from the cluster's start)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install -y chromium)"),
]

N_COST = """() => {
  const d = window.Bokeh && Bokeh.documents && Bokeh.documents[0];
  const s = d && d.get_model_by_name("cost-source");
  return s ? s.data.cost.length : -1;
}"""
IMAGE = """() => {
  const s = Bokeh.documents[0].get_model_by_name("phase-source");
  if (!s || s.data.image.length == 0) return null;
  const im = s.data.image[0];
  const flat = Array.from(im.length !== undefined && typeof im[0] === "number" ? im : im.flat ? im.flat() : []);
  return {n: flat.length, finite: flat.filter(Number.isFinite).length, min: Math.min(...flat), max: Math.max(...flat)};
}"""
TASK_NAMES = """() => {
  const names = new Set();
  for (const d of Bokeh.documents)
    for (const m of d.all_models)
      if (m.data && m.data.name && m.data.key && m.data.duration) for (const n of m.data.name) names.add(String(n));
  return Array.from(names);
}"""


class _Stop(Exception):
    """Ends the background run once the browser has seen enough."""


def test_dashboard_page_in_chromium(client, small_pbtio3, tmp_path):
    from playwright.sync_api import sync_playwright

    stop, first = threading.Event(), threading.Event()
    seen, errors = [], []

    def progress(it, cost):
        seen.append(cost)
        first.set()
        if stop.is_set():
            raise _Stop

    def run():
        try:
            # the tile graph, so the task stream shows each tile's gradient and strip tasks (the
            # default peer exchange shows one stage task per worker and block of iterations)
            with dask.config.set({"daskptycho.schedule.exchange": "scheduler"}):
                dp.reconstruct(str(small_pbtio3), engine="gd", tiles=(2, 2), slices=2, iterations=400, client=client, progress=progress)
        except _Stop:
            pass
        except Exception as e:  # reported by the main thread
            errors.append(e)
        finally:
            first.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    base = client.dashboard_link.rsplit("/", 1)[0]
    shots = os.environ.get("DASKPTYCHO_SCREENSHOT") or str(tmp_path)
    try:
        assert first.wait(180), "the reconstruction did not report an iteration"
        assert not errors, errors
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1480, "height": 620})
            page.goto(f"{base}/daskptycho", wait_until="load", timeout=60_000)
            page.wait_for_function(f"({N_COST})() > 0", timeout=60_000, polling=200)
            n1 = page.evaluate(N_COST)
            image = page.evaluate(IMAGE)
            # the task stream page: gradient and pass tasks of the running reconstruction
            tasks = browser.new_page(viewport={"width": 1200, "height": 600})
            tasks.goto(f"{base}/tasks", wait_until="load", timeout=60_000)
            tasks.wait_for_function(f"""() => {{ const n = ({TASK_NAMES})();
                return n.includes("grad") && n.some(x => /^[vh](fwd|bwd)/.test(x)); }}""", timeout=90_000, polling=500)
            names = tasks.evaluate(TASK_NAMES)
            # a later look at the page: the curve has grown
            page.bring_to_front()
            page.wait_for_function(f"({N_COST})() > {n1}", timeout=120_000, polling=200)
            n2 = page.evaluate(N_COST)
            image = page.evaluate(IMAGE) or image
            page.wait_for_timeout(600)  # one more redraw, then the picture
            path = os.path.join(shots, "dashboard.png")
            os.makedirs(shots, exist_ok=True)
            page.screenshot(path=path + ".tmp.png", full_page=True)
            os.replace(path + ".tmp.png", path)
            title = page.evaluate('() => Bokeh.documents[0].get_model_by_name("title").text')
            browser.close()
    finally:
        stop.set()
        thread.join(300)
    assert not errors, errors
    assert n2 > n1 >= 1
    assert image is not None and image["n"] > 100 and image["finite"] == image["n"] and image["max"] > image["min"]
    assert "engine <b>gd</b>" in title
    assert "grad" in names and {"vfwd", "vfwd-strip", "vbwd", "hfwd", "hbwd"} & set(names), names
    # the screenshot is not blank: the page drew an image, a curve and tiles
    import matplotlib.image

    px = matplotlib.image.imread(path)[..., :3]
    assert px.shape[0] > 300 and px.shape[1] > 1000
    assert np.std(px) > 0.05 and len(np.unique(px.reshape(-1, 3)[::97], axis=0)) > 20
