"""Open a running and a finished quietscope output in napari and neuroglancer; save screenshots.

Starts ``quietscope predict`` (a random-weight N2V model: what is shown is the streaming, not the
denoising) on a generated 8192² input, and at ~30 % of the blocks and at the end:

* napari (napari-ome-zarr plugin, under Xvfb or ``QT_QPA_PLATFORM=offscreen``): opens the output,
  zooms out to the whole image, saves ``napari_30.png`` / ``napari_end.png``;
* neuroglancer (the client bundled with the ``neuroglancer`` Python package, in headless Chromium):
  serves the output from a loopback HTTP server with CORS and range requests, saves
  ``neuroglancer_30.png`` / ``neuroglancer_end.png``;

plus ``state.json`` (the output's ``quietscope_state`` and ``omero`` at both moments).
Not part of ``make test``: it installs nothing and exits 0 with a message naming what is missing
when napari, napari-ome-zarr, neuroglancer or a Chromium binary is absent.

Usage::

    .venv/bin/python benchmarks/viewer_probe.py [--size 8192] [--out docs/images/watching]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def missing() -> list[str]:
    """What the probe needs and this machine lacks."""
    out = [m for m in ("napari", "napari_ome_zarr", "neuroglancer") if importlib.util.find_spec(m) is None]
    if not any(shutil.which(c) for c in CHROMIUM):
        out.append("a Chromium binary (" + " / ".join(CHROMIUM) + ")")
    if not os.environ.get("DISPLAY") and not shutil.which("xvfb-run") and os.environ.get("QT_QPA_PLATFORM") != "offscreen":
        out.append("a display (Xvfb / xvfb-run, or QT_QPA_PLATFORM=offscreen)")
    return out


class CORSRangeHandler(SimpleHTTPRequestHandler):
    """Static files with CORS and single byte-range requests (what neuroglancer's zarr reader sends)."""

    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        rng = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not rng or not path.is_file():
            return super().do_GET()
        data = path.read_bytes()
        start_s, _, end_s = rng.removeprefix("bytes=").partition("-")
        start = int(start_s) if start_s else max(0, len(data) - int(end_s))
        end = int(end_s) if start_s and end_s else len(data) - 1
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(data[start:end + 1])

    def log_message(self, *args) -> None:
        pass


def serve(root: Path) -> tuple[ThreadingHTTPServer, int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CORSRangeHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def napari_shot(output: Path, png: Path) -> None:
    """A fresh napari process per shot: napari caches chunks by array, a new viewer reads anew."""
    code = f"""
import napari
v = napari.Viewer(show=False)
v.open({str(output)!r}, plugin="napari-ome-zarr")
v.reset_view()
v.screenshot({str(png)!r}, canvas_only=True, flash=False)
v.close()
"""
    cmd = [sys.executable, "-c", code]
    if not os.environ.get("DISPLAY") and shutil.which("xvfb-run"):
        cmd = ["xvfb-run", "-a", *cmd]
    subprocess.run(cmd, check=True, timeout=300)


def neuroglancer_shot(url: str, png: Path) -> None:
    import neuroglancer

    neuroglancer.set_server_bind_address("127.0.0.1")
    viewer = neuroglancer.Viewer()
    with viewer.txn() as s:
        s.layers["quietscope"] = neuroglancer.ImageLayer(source=f"zarr://{url}")
        s.layout = "xy"
    chrome = next(shutil.which(c) for c in CHROMIUM if shutil.which(c))
    subprocess.run([chrome, "--headless=new", "--no-sandbox", "--disable-gpu", "--use-gl=swiftshader",
                    "--window-size=1200,900", "--virtual-time-budget=20000", f"--screenshot={png}", viewer.get_viewer_url()],
                   check=True, timeout=300, capture_output=True)


def attrs(output: Path) -> dict:
    doc = json.loads((output / "zarr.json").read_text())["attributes"]
    return {"quietscope_state": doc.get("quietscope_state"), "omero": doc.get("omero")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "images" / "watching"))
    args = ap.parse_args()
    lacking = missing()
    if lacking:
        print("viewer_probe: skipped, this machine lacks " + ", ".join(lacking) + " (the probe installs nothing)")
        return
    from benchmarks.harness import make_volume, random_model

    shots = Path(args.out)
    shots.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        src = make_volume(tmp / "in.ome.zarr", (args.size, args.size), (256, 256))
        model = random_model(tmp / "m.qs", 2, depth=2, filters=8)
        out = tmp / "out.ome.zarr"
        server, port = serve(tmp)
        url = f"http://127.0.0.1:{port}/out.ome.zarr"
        job = subprocess.Popen([sys.executable, "-m", "quietscope_cli.main", "predict", model, src, "-o", str(out),
                                "--no-progress", "--block", "768,768"])  # 3 x 3 chunks: not 2^k-aligned on purpose
        states = {}
        while job.poll() is None:
            st = (attrs(out) if (out / "zarr.json").exists() else {}).get("quietscope_state") or {}
            if st.get("blocks_total") and st["blocks_done"] >= 0.3 * st["blocks_total"]:
                break
            time.sleep(1)
        states["30%"] = attrs(out)
        napari_shot(out, shots / "napari_30.png")
        neuroglancer_shot(url, shots / "neuroglancer_30.png")
        job.wait()
        states["end"] = attrs(out)
        napari_shot(out, shots / "napari_end.png")
        neuroglancer_shot(url, shots / "neuroglancer_end.png")
        server.shutdown()
    (shots / "state.json").write_text(json.dumps(states, indent=2))
    print(f"screenshots and state.json in {shots}")


if __name__ == "__main__":
    main()
