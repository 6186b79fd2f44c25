"""The bundled OHIF at `/ohif/` shows a batch DICOM SEG over its CT (issue 7's viewer target).

Real parts only: a phantom CT series in a real Orthanc (Debian packages), `clinlens batch` on the
DICOMweb source with `--stow`, the real MONAI Label server proxying that Orthanc, and the OHIF v3
that MONAI Label ships, in Debian's headless Chromium (WebGL through SwiftShader) driven by
Playwright. The SEG is opened as a clinician would (double-click its thumbnail, answer "Yes"), and
the red overlay on the screen must coincide with the SEG's own mask on the displayed slice, mapped
to the screen by the viewport's `worldToCanvas` from the DICOM geometry.
"""
import io
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from clinlens.batch.discover import Selection
from clinlens.batch.process import BatchConfig
from clinlens.batch.run import run_batch
from clinlens.data.dicom_seg import read_seg, sorted_series_files
from test_dicomweb import dicomweb_server, orthanc_with_ct

CHROMIUM = ("chromium-headless-shell", "chromium")
PROMPT = "lung nodule"


def chromium_path() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM) if p), None)


@pytest.fixture(scope="module")
def stowed(tmp_path_factory):
    """Orthanc holding a phantom CT and the SEG/SR/heatmap that `clinlens batch --stow` sent back."""
    root = tmp_path_factory.mktemp("ohif")
    with orthanc_with_ct(root, "the OHIF test") as (o, _, folder):
        res = run_batch(o.dicomweb_url, root / "batch", BatchConfig(out_dir=str(root / "batch"), prompts=(PROMPT,)),
                        Selection.build(modalities=["CT"]), executor="local", workers=0, stow=True, progress=False)
        (row,) = res.rows
        assert row["status"] == "ok" and row["stowed"] == 3, row
        with dicomweb_server(o, root) as s:
            yield {"url": s.url, "root": root, "folder": folder, "row": row,
                   "seg": Path(row["out_dir"]) / "seg.dcm"}


def world_points(files: list[str], k: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Patient coordinates (mm) of pixel centres (row, col) of source image `k` (DICOM C.7.6.2.1.1)."""
    ds = pydicom.dcmread(files[k], stop_before_pixels=True)
    ipp = np.array(ds.ImagePositionPatient, float)
    iop = np.array(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)  # row spacing, column spacing
    return ipp + np.outer(cols * dc, iop[:3]) + np.outer(rows * dr, iop[3:])


def to_canvas(page, world: np.ndarray) -> np.ndarray:
    """Patient coordinates -> CSS pixels on the OHIF viewport's canvas (cornerstone3D `worldToCanvas`)."""
    return np.array(page.evaluate("(pts) => { const vp = window.cornerstone.getEnabledElements()[0].viewport;"
                                  " return pts.map(p => vp.worldToCanvas(p)); }", world.tolist()))


def red_overlay(png: bytes, box: dict) -> np.ndarray:
    """Screen pixels of the canvas where red dominates (OHIF paints the first segment red; the CT is grey)."""
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    x0, y0 = int(round(box["x"])), int(round(box["y"]))
    img = img[y0:y0 + int(box["height"]), x0:x0 + int(box["width"])]
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return (r - np.maximum(g, b)) > 40


def test_ohif_shows_the_batch_seg_over_its_ct(stowed, tmp_path):
    exe = chromium_path()
    if exe is None:
        pytest.fail("headless Chromium is needed: `bash scripts/setup-test-deps.sh` installs Debian's "
                    "chromium-headless-shell")
    from playwright.sync_api import sync_playwright

    files = sorted_series_files(stowed["folder"])
    mask, names = read_seg(stowed["seg"], stowed["folder"])  # (z, y, x) over `files`
    assert PROMPT in names.values() and mask.any()
    sop = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    study = stowed["row"]["study_uid"]
    logs = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--use-angle=swiftshader",
                                                               "--enable-unsafe-swiftshader"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("pageerror", lambda e: logs.append(str(e)))
            page.goto(f"{stowed['url']}/ohif/viewer?StudyInstanceUIDs={study}")
            thumb = page.get_by_text("clinlens batch SEG")
            thumb.wait_for(timeout=90_000)                              # OHIF listed the stowed SEG
            hide = page.get_by_role("button", name="Confirm and Hide")  # the disclaimer covers the viewport
            if hide.count():
                hide.click()
            thumb.dblclick()
            page.get_by_role("button", name="Yes").click(timeout=30_000)  # "open this Segmentation?"
            page.wait_for_function("window.services.segmentationService.getSegmentations().length > 0",
                                   timeout=60_000)
            labels = page.evaluate("window.services.segmentationService.getSegmentations()"
                                   ".flatMap(s => Object.values(s.segments || {}).filter(Boolean).map(g => g.label))")
            assert PROMPT in labels, labels
            time.sleep(1)
            assert "RecommendedDisplayCIELabValue" not in page.inner_text("body")  # OHIF's missing-colour toast

            # show the slice with the most segmented pixels, then find it among the viewport's images
            k = int(mask.reshape(len(mask), -1).sum(1).argmax())
            image_ids = page.evaluate("window.cornerstone.getEnabledElements()[0].viewport.getImageIds()")
            index = next(i for i, iid in enumerate(image_ids) if sop[k] in iid)
            page.evaluate("""async (i) => {
                const vp = window.cornerstone.getEnabledElements()[0].viewport;
                const jump = window.cornerstone.utilities.jumpToSlice || window.cornerstoneTools.utilities.jumpToSlice;
                await jump(vp.element, {imageIndex: i});
                vp.render(); }""", index)
            time.sleep(2)
            shown = page.evaluate("window.cornerstone.getEnabledElements()[0].viewport.getCurrentImageId()")
            assert sop[k] in shown, "OHIF did not move to the chosen slice"

            rows, cols = np.nonzero(mask[k])
            canvas_xy = to_canvas(page, world_points(files, k, rows, cols))
            o, right, down = to_canvas(page, world_points(files, k, np.array([0, 0, 1]), np.array([0, 1, 0])))
            box = page.locator("canvas.cornerstone-canvas").first.bounding_box()
            png = page.screenshot()
            (tmp_path / "ohif_seg_over_ct.png").write_bytes(png)
        finally:
            browser.close()
    print(f"screenshot: {tmp_path / 'ohif_seg_over_ct.png'}")

    seen = red_overlay(png, box)
    expected = np.zeros_like(seen)
    hx, hy = (max(1.0, float(np.linalg.norm(v - o)) / 2) for v in (right, down))  # half an image pixel on screen
    for x, y in canvas_xy:
        expected[max(0, int(round(y - hy))):int(round(y + hy)), max(0, int(round(x - hx))):int(round(x + hx))] = True
    iou = (seen & expected).sum() / (seen | expected).sum()
    assert seen.sum() > 0.3 * expected.sum(), f"little overlay on screen ({seen.sum()} of ~{expected.sum()} px)"
    assert iou > 0.5, f"overlay does not sit on the SEG's mask: IoU {iou:.2f} (screen {seen.sum()} px, mask {expected.sum()} px)"
    assert not logs, f"page errors: {logs}"
