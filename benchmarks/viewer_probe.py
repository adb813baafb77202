"""Open a running and a finished quietscope output in napari and neuroglancer; save screenshots.

Starts ``quietscope predict`` (a random-weight N2V model: what is shown is the streaming, not the
denoising; blocks of 3 x 3 chunks, not 2^k-aligned on purpose) on a generated 8192² input, and at
~30 % of the blocks and at the end:

* napari 0.9 (napari-ome-zarr, a real window under Xvfb): opens the output zoomed out to the whole
  image, ``napari_30.png``; the same window then waits for the job to end and tries each refresh a
  user may try: nothing (``napari_end_stale.png``), ``layer.refresh()``, remove the layer and open the
  output again, and turning napari's dask cache off (Preferences, ``napari_end_cache_off.png``);
  a fresh napari at the end: ``napari_end.png``;
* neuroglancer: the client bundled with the ``neuroglancer`` Python package (its Python server, on
  127.0.0.1), the output from the probe's own loopback server (CORS, range requests, another
  origin), the layer added with automatic type detection as a user adds a source; one headless
  Chromium tab, driven over the DevTools protocol: ``neuroglancer_30.png``, the same tab after the
  end (``neuroglancer_end_stale.png``), after the browser's reload (``neuroglancer_end_reload.png``),
  with the layer removed and added again (``neuroglancer_end.png``), and added as a user's "+" layer
  with "Create as image layer" clicked (``neuroglancer_end_image_layer.png``: neuroglancer then
  ignores the ``omero`` metadata).

``probe.json`` records the size, the timings, the output's ``quietscope_state`` and ``omero`` at both
moments, ``quietscope info``'s status line, per napari view the layer's contrast limits and the
fraction of the coarsest level napari reads as 0 (not written yet, or a stale cached chunk), and per
neuroglancer view the contrast the client applied.

Not part of ``make test``: it installs nothing and exits 0 with a message naming what is missing
when napari, napari-ome-zarr, neuroglancer, a Chromium binary or a display (Xvfb) is absent.

Usage (the viewers in their own venv: docs/guide/watching-a-run.md, "Making these screenshots")::

    PYTHONPATH=src:cli:. VIEWER_VENV/bin/python benchmarks/viewer_probe.py [--size 8192] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import importlib.util
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: Xvfb's default depth (8 bit) gives napari a black canvas: ask for 24 bit.
XVFB_SCREEN = "-screen 0 1600x1200x24"
#: Every wait of the probe is bounded (seconds).
JOB_TIMEOUT = 3 * 3600
SHOT_TIMEOUT = 300
#: Chromium page and napari window sizes (pixels).
PAGE = (1400, 900)
NAPARI_WINDOW = (1200, 900)


def missing() -> list[str]:
    """What the probe needs and this machine lacks."""
    out = [m for m in ("napari", "napari_ome_zarr", "neuroglancer") if importlib.util.find_spec(m) is None]
    if not any(shutil.which(c) for c in CHROMIUM):
        out.append("a Chromium binary (" + " / ".join(CHROMIUM) + ")")
    if not os.environ.get("DISPLAY") and not shutil.which("xvfb-run"):
        out.append("a display (Xvfb's xvfb-run, or DISPLAY)")
    return out


# ---- the HTTP side -------------------------------------------------------------------------------
class CORSRangeHandler(SimpleHTTPRequestHandler):
    """Static files with CORS (preflight included) and single byte ranges, as neuroglancer reads zarr.

    A missing file is a 404, which neuroglancer and zarr readers take as a chunk not written yet.
    """

    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "Range")
        self.send_header("Access-Control-Expose-Headers", "Content-Range, Content-Length")
        self.send_header("Accept-Ranges", "bytes")
        # A running job rewrites zarr.json and adds chunks: no browser caching.
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def do_OPTIONS(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        rng = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not rng or not path.is_file():
            return super().do_GET()
        size = path.stat().st_size
        span = byte_range(rng, size)
        if span is None:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()
            return None
        start, end = span
        with path.open("rb") as f:
            f.seek(start)
            data = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return None

    def log_message(self, *args) -> None:
        pass


def byte_range(header: str, size: int) -> tuple[int, int] | None:
    """``(first, last)`` byte of a single ``bytes=a-b`` / ``a-`` / ``-n`` range; None when unsatisfiable."""
    first, _, last = header.strip().removeprefix("bytes=").partition("-")
    if "," in header or (not first and not last):
        return None
    if not first:
        start, end = max(0, size - int(last)), size - 1
    else:
        start, end = int(first), min(size - 1, int(last)) if last else size - 1
    return (start, end) if start <= end and start < size else None


def serve(root: Path, handler: type[SimpleHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    """A static server on 127.0.0.1 (a free port) in a daemon thread, and its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def neuroglancer_state(data_url: str, size: int, layer_type: str = "auto", viewport: int = 820) -> dict:
    """A 2D view of the whole image (cross-section scale: image pixels per screen pixel), layer panel open.

    ``auto``: neuroglancer detects the layer type and applies the OME ``omero`` metadata; ``new``: the
    layer a user gets from the "+" button, waiting for "Create as ... layer" to be clicked.
    """
    return {
        "layers": [{"type": layer_type, "source": f"zarr://{data_url}", "name": "quietscope"}],
        "layout": "xy",
        "crossSectionScale": 1.1 * size / viewport,
        "selectedLayer": {"layer": "quietscope", "visible": True},
    }


def neuroglancer_viewer(state: dict):
    """A viewer of the ``neuroglancer`` package: its bundled client, served on 127.0.0.1, showing ``state``.

    That client is the Python-integration build (it takes its state from this server); the data come
    from another origin, the probe's own server, so CORS is exercised as for any hosted client.
    """
    import neuroglancer

    neuroglancer.set_server_bind_address("127.0.0.1")
    viewer = neuroglancer.Viewer()
    viewer.set_state(neuroglancer.ViewerState(state))
    return viewer


#: True once neuroglancer has drawn every visible chunk (``window.viewer`` is the client's viewer).
NG_READY = "!!(window.viewer && window.viewer.display.isReady() && window.viewer.layerManager.managedLayers.length)"


def chromium(profile: Path) -> tuple[subprocess.Popen, int]:
    """Headless Chromium (software WebGL) with DevTools on a loopback port; the process and the port."""
    chrome = next(shutil.which(c) for c in CHROMIUM if shutil.which(c))
    proc = subprocess.Popen([chrome, "--headless=new", "--no-sandbox", "--enable-unsafe-swiftshader",
                             "--use-angle=swiftshader", "--no-first-run", "--disable-background-networking",
                             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                             f"--user-data-dir={profile}", f"--window-size={PAGE[0]},{PAGE[1]}", "--hide-scrollbars",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (port_file.exists() and port_file.read_text().strip()):
        time.sleep(0.2)
    if not port_file.exists():
        stop(proc)
        raise RuntimeError(f"{chrome} did not open its DevTools port within 60 s")
    return proc, int(port_file.read_text().split()[0])


async def cdp_shot(port: int, action: str, png: Path, timeout: float, url: str = "") -> dict:
    """In the browser's page: ``navigate`` to ``url``, ``reload`` it, ``stay``, or ``create-image`` (reload,
    then click a new layer's "Create as image layer"); wait until neuroglancer
    reports every visible chunk drawn (twice, 1 s apart) or ``timeout``, then capture the page.

    The DevTools protocol over tornado's websocket client (a dependency of ``neuroglancer``): no
    driver to install. The page outlives the connection, so a later call sees what a user who kept
    the tab open sees.
    """
    from tornado.httpclient import AsyncHTTPClient
    from tornado.websocket import websocket_connect

    targets = json.loads((await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/json/list")).body)
    page = next(t for t in targets if t["type"] == "page")
    ws = await websocket_connect(page["webSocketDebuggerUrl"], max_message_size=1 << 28)
    ids = itertools.count(1)

    async def call(method: str, **params):
        n = next(ids)
        await ws.write_message(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = json.loads(await ws.read_message())
            if msg.get("id") == n:
                return msg.get("result", {})

    t0 = time.monotonic()
    # The window's own size leaves less to the page: fix the page's size (for this connection).
    await call("Emulation.setDeviceMetricsOverride", width=PAGE[0], height=PAGE[1], deviceScaleFactor=1, mobile=False)
    if action == "navigate":
        await call("Page.navigate", url=url)
    elif action in ("reload", "create-image"):
        await call("Page.reload", ignoreCache=False)  # the browser's reload button
    if action == "create-image":
        await click_create_image(call, timeout)
    ready = 0
    while ready < 2 and time.monotonic() - t0 < timeout:
        await asyncio.sleep(1)
        res = await call("Runtime.evaluate", expression=NG_READY, returnByValue=True)
        ready = ready + 1 if res.get("result", {}).get("value") else 0
    shot = await call("Page.captureScreenshot", format="png")
    png.write_bytes(base64.b64decode(shot["data"]))
    ws.close()
    return {"png": png.name, "action": action, "ready": ready >= 2, "s": round(time.monotonic() - t0, 1)}


#: The "Create as image layer" button of a new layer's source tab (the first of the two it offers;
#: the second is "Create as multi-channel image layer").
NG_CREATE_IMAGE = "document.querySelectorAll('.neuroglancer-layer-data-sources-tab-type-detection')"


async def click_create_image(call, timeout: float) -> None:
    """Wait for the detected-type buttons of a new layer, then click "Create as image layer"."""
    deadline = time.monotonic() + timeout
    shown = f"Array.from({NG_CREATE_IMAGE}).some(e => e.style.display !== 'none')"
    while time.monotonic() < deadline:
        res = await call("Runtime.evaluate", expression=shown, returnByValue=True)
        if res.get("result", {}).get("value"):
            await call("Runtime.evaluate", expression=f"{NG_CREATE_IMAGE}[0].click()")
            return
        await asyncio.sleep(1)


class Browser:
    """One headless Chromium tab on one neuroglancer viewer for the run (a fresh profile); stop() ends it."""

    def __init__(self, profile: Path, viewer) -> None:
        shutil.rmtree(profile, ignore_errors=True)
        profile.mkdir(parents=True)
        self.viewer = viewer
        self.proc, self.port = chromium(profile)

    def shot(self, action: str, png: Path) -> dict:
        """:func:`cdp_shot`, and the layer as the client left it (its contrast: ``shaderControls``)."""
        rec = asyncio.run(cdp_shot(self.port, action, png, SHOT_TIMEOUT / 2, self.viewer.get_viewer_url()))
        layers = self.viewer.state.to_json().get("layers", [])
        rec["layer"] = {k: layers[0].get(k) for k in ("type", "name", "shaderControls")} if layers else None
        return rec

    def readd(self, state: dict, png: Path, action: str = "reload") -> dict:
        """Remove the layer and add the source again (``state``), reload (and ``action``), capture."""
        import neuroglancer

        self.viewer.set_state(neuroglancer.ViewerState(state))
        return self.shot(action, png)

    def stop(self) -> None:
        stop(self.proc)


# ---- the napari side (runs in its own process, under Xvfb) ---------------------------------------
def napari_cmd(*args: str) -> list[str]:
    """This script with ``args`` in a fresh Python, under ``xvfb-run`` unless a display is set."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    if not os.environ.get("DISPLAY"):
        cmd = ["xvfb-run", "-a", "-s", XVFB_SCREEN, *cmd]
    return cmd


def napari_view(viewer, png: Path | None) -> dict:
    """Screenshot the window (canvas and the layer's controls) unless ``png`` is None; the layer's
    contrast and how much of the coarsest level napari reads as 0 (not written, or a stale cached chunk)."""
    import numpy as np

    viewer.reset_view()
    shot = viewer.screenshot(str(png) if png else None, canvas_only=False, flash=False)
    layer = viewer.layers[0]
    with layer.dask_optimized_slicing():  # napari's own read path, its chunk cache included
        coarsest = np.asarray(layer.data[-1])
    return {"png": png.name if png else None, "shot_px": list(shot.shape[:2]),
            "contrast_limits": [float(v) for v in layer.contrast_limits],
            "contrast_limits_range": [float(v) for v in layer.contrast_limits_range],
            "levels": len(layer.data), "shown_level": int(layer.data_level),
            "coarsest_zero_fraction": round(float(np.mean(coarsest == 0)), 4)}


def napari_open(viewer, output: Path) -> None:
    viewer.open(str(output), plugin="napari-ome-zarr")


def napari_reopen(viewer, output: Path) -> None:
    """What a user does first: remove the layer, open the output again."""
    viewer.layers.clear()
    napari_open(viewer, output)


def napari_follow(viewer, output: Path, shots: Path) -> dict:
    """After the job ends, in the window opened mid-run: each refresh a user may try, in order.

    napari keeps read chunks in one dask cache keyed by the dask array's name, which
    ``dask.array.from_zarr`` derives from the array's path: a re-opened layer gets the same keys.
    """
    from napari.settings import get_settings

    wait_for(output, lambda st: st.get("status") in ("complete", "interrupted"), JOB_TIMEOUT)
    views = {"as_is": napari_view(viewer, shots / "napari_end_stale.png")}
    viewer.layers[0].refresh()
    views["layer_refresh"] = napari_view(viewer, None)
    napari_reopen(viewer, output)
    views["reopened"] = napari_view(viewer, None)
    # Preferences > Application > "Dask cache: enabled" off (napari resizes the cache to 0 bytes).
    get_settings().application.dask.enabled = False
    viewer.layers[0].refresh()
    views["cache_off_refresh"] = napari_view(viewer, shots / "napari_end_cache_off.png")
    return views


def napari_session(output: Path, shots: Path, follow: bool) -> None:
    """One napari window: a view now; with ``follow``, the same window after the job ends (refreshes)."""
    import napari
    import napari._qt.qt_main_window as qt_main_window

    # napari 0.9 shows a toast over the canvas that its PyQt5 support is deprecated: not ours to show.
    qt_main_window.SHOW_QT_WARNING = False

    viewer = napari.Viewer(show=True)
    viewer.window.resize(*NAPARI_WINDOW)
    napari_open(viewer, output)
    first = "napari_30.png" if follow else "napari_end.png"
    views = {first: napari_view(viewer, shots / first)}
    if follow:
        views["after_end"] = napari_follow(viewer, output, shots)
    viewer.close()
    print("NAPARI " + json.dumps(views), flush=True)


def run_napari(output: Path, shots: Path, follow: bool, tmp: Path) -> subprocess.Popen:
    """The napari session in its own process (group), with napari settings in ``tmp``, not the user's."""
    args = ["--napari-session", str(output), "--out", str(shots)] + (["--follow"] if follow else [])
    env = {**os.environ, "NAPARI_CONFIG": str(tmp / f"napari-{int(follow)}.yaml")}
    return subprocess.Popen(napari_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env, start_new_session=True)


def napari_result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=JOB_TIMEOUT + SHOT_TIMEOUT)
    lines = [ln for ln in out.splitlines() if ln.startswith("NAPARI ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"napari session failed (exit {proc.returncode}): {out[-2000:]}")
    return json.loads(lines[-1].removeprefix("NAPARI "))


# ---- the output's visible state ------------------------------------------------------------------
def attrs(output: Path) -> dict:
    """``quietscope_state`` and the top-level ``omero`` of an output (0.5's zarr.json or 0.4's .zattrs)."""
    for name in ("zarr.json", ".zattrs"):
        if (output / name).exists():
            doc = json.loads((output / name).read_text())
            doc = doc.get("attributes", doc)
            return {"quietscope_state": doc.get("quietscope_state"), "omero": doc.get("omero")}
    return {}


def wait_for(output: Path, done, timeout: float, job: subprocess.Popen | None = None) -> dict:
    """Poll the output's ``quietscope_state`` (1 s) until ``done(state)``, the job exits or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            st = attrs(output).get("quietscope_state") or {}
        except (OSError, ValueError):  # written atomically, but be safe against a partial read
            st = {}
        if (st and done(st)) or (job is not None and job.poll() is not None):
            return st
        time.sleep(1)
    raise TimeoutError(f"no such state of {output} within {timeout:.0f} s")


def info_status(output: Path) -> str:
    """The ``status:`` line of ``quietscope info OUTPUT``."""
    res = subprocess.run([sys.executable, "-m", "quietscope_cli.main", "info", str(output)],
                         capture_output=True, text=True, timeout=SHOT_TIMEOUT)
    lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip().startswith("status:")]
    return lines[-1] if lines else res.stdout[-500:] + res.stderr[-500:]


# ---- the run -------------------------------------------------------------------------------------
def predict_job(model: str, src: str, out: Path, threads: int) -> subprocess.Popen:
    """``quietscope predict`` with blocks of 3 x 3 chunks (not 2^k-aligned on purpose), few threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "QS_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-m", "quietscope_cli.main", "predict", model, src, "-o", str(out),
                             "--no-progress", "--block", "768,768", "--threads", str(threads)], env=env,
                            start_new_session=True)


def moment(output: Path) -> dict:
    """The output's state and ``quietscope info``'s status line, now."""
    return {**attrs(output), "info": info_status(output)}


def stop(proc: subprocess.Popen | None) -> None:
    """End a process the probe started, with its group (xvfb-run and its Xvfb), if it still runs."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def probe(size: int, shots: Path, threads: int, tmp: Path) -> dict:
    """Generate the input, run predict, take the screenshots at ~30 % and at the end; the report."""
    import neuroglancer

    from benchmarks.harness import make_volume, random_model

    t0 = time.perf_counter()
    src = make_volume(tmp / "in.ome.zarr", (size, size), (256, 256))
    model = random_model(tmp / "m.qs", 2, depth=2, filters=8)
    report = {"size": [size, size], "chunks": [256, 256], "block": [768, 768], "threads": threads,
              "input_s": round(time.perf_counter() - t0, 1)}
    out = tmp / "out.ome.zarr"
    data, data_url = serve(tmp, CORSRangeHandler)
    # Keep the viewer referenced: the neuroglancer server holds it weakly and answers 404 once it is gone.
    ng_state = neuroglancer_state(f"{data_url}/out.ome.zarr", size)
    ng_viewer = neuroglancer_viewer(ng_state)
    job = nap = browser = None
    t0 = time.perf_counter()
    try:
        job = predict_job(model, src, out, threads)
        wait_for(out, lambda st: st.get("blocks_total") and st["blocks_done"] >= 0.3 * st["blocks_total"], JOB_TIMEOUT, job)
        report["30%"] = {"at_s": round(time.perf_counter() - t0, 1)}
        nap = run_napari(out, shots, follow=True, tmp=tmp)
        report["30%"].update(moment(out))
        browser = Browser(tmp / "chrome", ng_viewer)
        report["30%"]["neuroglancer"] = [browser.shot("navigate", shots / "neuroglancer_30.png")]
        if job.wait(timeout=JOB_TIMEOUT):
            raise RuntimeError(f"predict failed (exit {job.returncode})")
        report["predict_s"] = round(time.perf_counter() - t0, 1)
        report["napari_session"] = napari_result(nap)
        report["end"] = moment(out)
        report["end"]["neuroglancer"] = [browser.shot("stay", shots / "neuroglancer_end_stale.png"),
                                         browser.shot("reload", shots / "neuroglancer_end_reload.png"),
                                         browser.readd(ng_state, shots / "neuroglancer_end.png"),
                                         browser.readd(neuroglancer_state(f"{data_url}/out.ome.zarr", size, "new"),
                                                       shots / "neuroglancer_end_image_layer.png", "create-image")]
        report["napari_fresh"] = napari_result(run_napari(out, shots, follow=False, tmp=tmp))
    finally:
        stop(job)
        stop(nap)
        if browser is not None:
            browser.stop()
        data.shutdown()
        neuroglancer.stop()
    return report


def pngs(report: dict) -> list[str]:
    """Every screenshot file named in the report."""
    if isinstance(report, dict):
        own = [report["png"]] if isinstance(report.get("png"), str) else []
        return own + [n for v in report.values() for n in pngs(v)]
    return [n for v in report for n in pngs(v)] if isinstance(report, list) else []


def compact(shots: Path, names: list[str]) -> None:
    """Re-save screenshots with a 256-colour octree palette: grey data and a few UI colours fit it, at a
    fifth of the bytes (median-cut palettes merge the rare UI colours: yellow buttons)."""
    from PIL import Image  # napari's dependency

    for name in names:
        img = Image.open(shots / name).convert("RGB")
        img.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(shots / name, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192, help="side of the generated 2D input")
    ap.add_argument("--threads", type=int, default=1, help="predict's task and torch threads")
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "images" / "watching"))
    ap.add_argument("--napari-session", help=argparse.SUPPRESS)
    ap.add_argument("--follow", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.napari_session:
        return napari_session(Path(args.napari_session), Path(args.out), args.follow)
    lacking = missing()
    if lacking:
        print("viewer_probe: skipped, this machine lacks " + ", ".join(lacking) + " (the probe installs nothing)")
        return None
    shots = Path(args.out)
    shots.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        report = probe(args.size, shots, args.threads, Path(d))
    compact(shots, sorted(set(pngs(report))))
    (shots / "probe.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"screenshots and probe.json in {shots}")
    return None


if __name__ == "__main__":
    main()
