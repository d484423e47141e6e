"""The embedded sample ``data/sample/vtest/``: person crops cut from OpenCV's ``vtest.avi`` (see its PROVENANCE.md).

Checks the committed files themselves (no OpenCV needed); the helpers of ``tools/extract_vtest_crops.py`` are
checked only where OpenCV (the ``tools`` extra) is installed.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "vtest"
FRAME_W, FRAME_H = 768, 576
NAME = re.compile(r"^f(\d{6})_x(\d{4})_y(\d{4})\.jpg$")


@pytest.fixture(scope="module")
def rows():
    with open(SAMPLE / "crops.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["file", "frame", "x", "y", "w", "h", "score"]
        return list(reader)


def test_sample_folder_holds_only_crops_csv_and_provenance():
    assert SAMPLE.is_dir(), f"{SAMPLE} is missing"
    # ".partreid/" is the git-ignored file-index cache that `make demo` (luperson:data/sample/vtest) writes there
    names = {p.name for p in SAMPLE.iterdir()} - {".partreid"}
    assert "crops.csv" in names and "PROVENANCE.md" in names
    others = names - {"crops.csv", "PROVENANCE.md"}
    bad = sorted(n for n in others if not NAME.match(n))
    assert not bad, f"unexpected files in the sample folder: {bad[:5]}"
    assert len(others) >= 200


def test_sample_is_a_few_megabytes_at_most():
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file() and ".partreid" not in p.parts)
    assert total <= 5 * 1024 * 1024, f"sample is {total / 1e6:.1f} MB"


def test_csv_lists_exactly_the_jpegs_with_boxes_inside_the_frame(rows):
    on_disk = sorted(p.name for p in SAMPLE.glob("*.jpg"))
    listed = [r["file"] for r in rows]
    assert len(listed) == len(set(listed)), "crops.csv lists a file twice"
    assert sorted(listed) == on_disk
    for r in rows:
        frame, x, y, w, h = (int(r[k]) for k in ("frame", "x", "y", "w", "h"))
        # the file name encodes frame and top-left corner
        m = NAME.match(r["file"])
        assert (int(m.group(1)), int(m.group(2)), int(m.group(3))) == (frame, x, y), r["file"]
        assert 0 <= frame < 795  # vtest.avi has 795 frames
        assert x >= 0 and y >= 0 and w > 0 and h > 0
        assert x + w <= FRAME_W and y + h <= FRAME_H, f"{r['file']}: box outside 768x576"
        assert np.isfinite(float(r["score"]))


def test_every_crop_decodes_is_taller_than_wide_and_matches_its_box(rows):
    digests = set()
    for r in rows:
        path = SAMPLE / r["file"]
        with Image.open(path) as im:
            assert im.format == "JPEG", r["file"]
            im.load()  # full decode: raises on a truncated or corrupt file
            w, h = im.size
            assert im.mode == "RGB"
            pixels = np.asarray(im)
        assert h > w, f"{r['file']}: {w}x{h} is not taller than wide"
        assert (w, h) == (int(r["w"]), int(r["h"])), f"{r['file']}: size differs from its box (native resolution)"
        assert pixels.std() > 5.0, f"{r['file']}: looks blank"
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == len(rows), "two crops are byte-identical"


def test_crops_span_the_whole_video(rows):
    frames = np.array([int(r["frame"]) for r in rows])
    # sampled over the whole video, not one burst: every 100-frame stretch contributes
    assert set(frames // 100) == set(range(8))


def _load_tool():
    pytest.importorskip("cv2", reason="OpenCV (the 'tools' extra) is not installed")
    spec = importlib.util.spec_from_file_location("extract_vtest_crops", REPO / "tools" / "extract_vtest_crops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tool_iou_matrix_hand_computed():
    tool = _load_tool()
    a = np.array([[0, 0, 10, 20]])
    b = np.array([[5, 0, 10, 20], [0, 0, 10, 20], [20, 20, 5, 5], [0, 0, 5, 10]])
    iou, inside = tool.iou_matrix(a, b)
    # overlap 5x20=100; union 200+200-100=300
    np.testing.assert_allclose(iou[0], [100 / 300, 1.0, 0.0, 50 / 200])
    np.testing.assert_allclose(inside[0], [100 / 200, 1.0, 0.0, 50 / 200])


def test_tool_filter_boxes_rejects_bad_shapes_and_suppresses_overlaps():
    tool = _load_tool()
    boxes = np.array([
        [100, 100, 50, 100],  # 0: good, best score
        [105, 102, 50, 100],  # 1: near copy of 0 -> NMS
        [300, 100, 50, 100],  # 2: good
        [300, 100, 50, 50],   # 3: square -> aspect
        [740, 100, 50, 100],  # 4: sticks out of the 768-wide frame
        [500, 100, 20, 40],   # 5: too small
        [600, 100, 50, 100],  # 6: score too low
        [310, 110, 25, 50],   # 7: inside box 2, IoU 0.25 < nms_iou -> dropped only by containment
    ])
    scores = np.array([3.0, 2.0, 2.5, 3.0, 3.0, 3.0, 0.5, 2.4])
    kept = tool.filter_boxes(boxes, scores, (FRAME_H, FRAME_W), min_score=1.0, aspect=(1.8, 2.2),
                             min_height=50, max_height=200, nms_iou=0.3, contain=0.6)
    assert kept == [0, 2]
    no_contain = tool.filter_boxes(boxes, scores, (FRAME_H, FRAME_W), min_score=1.0, aspect=(1.8, 2.2),
                                   min_height=50, max_height=200, nms_iou=0.3, contain=1.01)
    assert no_contain == [0, 2, 7]
