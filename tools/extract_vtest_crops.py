#!/usr/bin/env python3
"""Cut the embedded sample of unlabelled pedestrian crops out of OpenCV's sample video ``vtest.avi``.

Dev-time tool (needs the ``tools`` extra: ``pip install -e ".[tools]"``, i.e. ``opencv-python-headless<5``;
OpenCV 5 dropped the HOG people detector). It is not imported by the package and not needed to use it.

What it does, over the whole video:

1. Background estimate: the per-pixel median of frames spread over the whole video (people walk through, so the
   median is the empty scene).
2. Every ``--every`` frames: OpenCV's built-in HOG + linear-SVM people detector
   (``cv2.HOGDescriptor_getDefaultPeopleDetector``, 64×128 window) on the frame enlarged by ``--upscale`` (the
   walkers in this video are 60–110 px tall, smaller than the detector's window), boxes mapped back to native pixels.
3. Keep well-shaped boxes: SVM score ≥ ``--min-score``; height/width ratio within ``--aspect``; box height within
   [``--min-height``, ``--max-height``] px; box entirely inside the frame; non-maximum suppression
   (``cv2.dnn.NMSBoxes``, IoU ``--nms-iou``) plus suppression of a box mostly contained in a higher-scoring one;
   at least ``--min-foreground`` of the box's central region differs from the background estimate (drops detections
   on the van, signs, cones and the tripod, which never move).
4. De-duplicate: a box whose IoU with a box kept in the previous sampled frame is ≥ ``--dedup-iou`` is a near copy
   (someone standing still) and is skipped.
5. If more than ``--max-crops`` boxes remain, a random subset (``--seed``) of that size is kept, so the sample still
   spans the whole video.

Writes ``<out>/fFFFFFF_xXXXX_yYYYY.jpg`` (frame index from 0, top-left corner in native pixels), cropped at native
resolution, JPEG quality ``--quality``, and ``<out>/crops.csv`` with columns ``file,frame,x,y,w,h,score``.
Old crops matching that name pattern in ``<out>`` are removed first; other files (``PROVENANCE.md``) are kept.
Progress and the summary go to stderr.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
from tqdm import tqdm

try:
    import cv2
except ImportError:  # pragma: no cover - dev-only dependency
    sys.exit('error: OpenCV is missing; install the dev-time extra: pip install -e ".[tools]"')

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VIDEO = REPO_ROOT.parent / "shared" / "data" / "video" / "vtest.avi"
DEFAULT_OUT = REPO_ROOT / "data" / "sample" / "vtest"
CROP_NAME = re.compile(r"^f\d{6}_x\d{4}_y\d{4}\.jpg$")

Box = Tuple[int, int, int, int]  # x, y, w, h in native pixels


def crop_name(frame: int, box: Box) -> str:
    """Deterministic crop file name ``fFFFFFF_xXXXX_yYYYY.jpg`` (frame index from 0, box top-left in pixels)."""
    return f"f{frame:06d}_x{box[0]:04d}_y{box[1]:04d}.jpg"


def iou_matrix(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Pairwise intersection-over-union and intersection-over-area-of-``a`` of boxes.

    Args:
        a: (N, 4) boxes ``x, y, w, h``; b: (M, 4) boxes.

    Returns:
        (iou, inter_over_a), both float64 (N, M).
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, 0][:, None], b[:, 0][None]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, 1][:, None], b[:, 1][None]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] * a[:, 3])[:, None]
    area_b = (b[:, 2] * b[:, 3])[None]
    union = area_a + area_b - inter
    return inter / np.maximum(union, 1e-9), inter / np.maximum(area_a, 1e-9)


def filter_boxes(boxes: np.ndarray, scores: np.ndarray, frame_hw: Tuple[int, int], *, min_score: float,
                 aspect: Tuple[float, float], min_height: int, max_height: int, nms_iou: float,
                 contain: float) -> List[int]:
    """Indices of the well-shaped, non-overlapping detections of one frame, best score first.

    Args:
        boxes: (N, 4) int ``x, y, w, h`` in native pixels; scores: (N,) float SVM margins.
        frame_hw: (height, width) of the frame in pixels.
        min_score: lowest SVM score kept.
        aspect: (lo, hi) allowed height/width ratio.
        min_height, max_height: allowed box height in pixels.
        nms_iou: IoU above which the lower-scoring of two boxes is dropped (``cv2.dnn.NMSBoxes``).
        contain: a box whose area lies at least this fraction inside a higher-scoring kept box is dropped.

    Returns:
        Indices into ``boxes`` (Python ints), highest score first.
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    fh, fw = frame_hw
    x, y, w, h = boxes.T
    ok = ((scores >= min_score) & (h >= min_height) & (h <= max_height)
          & (h >= aspect[0] * w) & (h <= aspect[1] * w)
          & (x >= 0) & (y >= 0) & (x + w <= fw) & (y + h <= fh))
    cand = np.flatnonzero(ok)
    if cand.size == 0:
        return []
    nms = cv2.dnn.NMSBoxes([[int(v) for v in boxes[i]] for i in cand], [float(scores[i]) for i in cand],
                           float(min_score), float(nms_iou))
    order = sorted((int(cand[j]) for j in np.ravel(nms)), key=lambda i: -scores[i])
    kept: List[int] = []
    for i in order:
        if kept:
            _, inside = iou_matrix(boxes[i:i + 1], boxes[kept])
            if inside.max() >= contain:
                continue
        kept.append(i)
    return kept


def foreground_fraction(frame: np.ndarray, background: np.ndarray, box: Box, diff_thr: int) -> float:
    """Fraction of the box's central region (middle half of the width, middle 80% of the height) whose largest
    per-channel absolute difference from the background estimate exceeds ``diff_thr`` (0–255)."""
    x, y, w, h = box
    x0, x1 = x + w // 4, x + w - w // 4
    y0, y1 = y + h // 10, y + h - h // 10
    d = cv2.absdiff(frame[y0:y1, x0:x1], background[y0:y1, x0:x1]).max(axis=2)
    return float((d > diff_thr).mean()) if d.size else 0.0


def median_background(video: Path, n_frames: int) -> np.ndarray:
    """Per-pixel median (uint8, H×W×3 BGR) of ``n_frames`` frames evenly spread over the video."""
    cap = cv2.VideoCapture(str(video))
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    step = max(1, total // n_frames)
    frames = []
    idx = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if idx % step == 0:
            frames.append(frame)
        idx += 1
    cap.release()
    if not frames:
        sys.exit(f"error: {video}: no frame could be decoded")
    return np.median(np.stack(frames), axis=0).astype(np.uint8)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults reproduce the committed sample; see data/sample/vtest/PROVENANCE.md)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO, help="input video")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder for the crops and crops.csv")
    p.add_argument("--every", type=int, default=4, help="run the detector on every N-th frame")
    p.add_argument("--max-crops", type=int, default=300, help="keep at most this many crops (random subset)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random subset")
    p.add_argument("--upscale", type=float, default=1.5, help="enlarge frames by this factor before detection")
    p.add_argument("--min-score", type=float, default=1.0, help="lowest HOG-SVM score kept")
    p.add_argument("--aspect", type=float, nargs=2, default=(1.8, 2.2), metavar=("LO", "HI"),
                   help="allowed height/width ratio")
    p.add_argument("--min-height", type=int, default=88, help="smallest box height in native pixels")
    p.add_argument("--max-height", type=int, default=205, help="largest box height in native pixels")
    p.add_argument("--nms-iou", type=float, default=0.3, help="IoU of non-maximum suppression")
    p.add_argument("--contain", type=float, default=0.6,
                   help="drop a box lying this much inside a better one")
    p.add_argument("--min-foreground", type=float, default=0.3,
                   help="least moving fraction of the box's centre (0 disables the check)")
    p.add_argument("--diff-threshold", type=int, default=30, help="pixel difference from background that counts")
    p.add_argument("--dedup-iou", type=float, default=0.7,
                   help="skip a box this close (IoU) to one kept in the previous sampled frame")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    args = p.parse_args(argv)
    if args.every < 1 or args.max_crops < 1 or args.upscale <= 0:
        p.error("--every and --max-crops must be >= 1 and --upscale > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Detect, filter and write the crops and ``crops.csv``; returns the exit status (0). Exits with a one-line
    ``error:`` message when the video is missing or unreadable or a crop cannot be written."""
    args = parse_args(argv)
    if not args.video.is_file():
        sys.exit(f"error: {args.video}: video not found (expected ../shared/data/video/vtest.avi beside the repo)")

    background = median_background(args.video, 64) if args.min_foreground > 0 else None
    hog = cv2.HOGDescriptor()
    hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())

    cap = cv2.VideoCapture(str(args.video))
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    found: List[Tuple[int, Box, float]] = []
    crops = {}
    prev: np.ndarray = np.zeros((0, 4))
    n_raw = n_shape = n_fg = 0
    idx = -1
    progress = tqdm(total=total, desc="frames", unit="frame", file=sys.stderr)
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        idx += 1
        progress.update(1)
        if idx % args.every:
            continue
        fh, fw = frame.shape[:2]
        img = cv2.resize(frame, None, fx=args.upscale, fy=args.upscale, interpolation=cv2.INTER_LINEAR) \
            if args.upscale != 1 else frame
        rects, weights = hog.detectMultiScale(img, winStride=(8, 8), padding=(8, 8), scale=1.05)
        boxes = np.round(np.asarray(rects, dtype=np.float64).reshape(-1, 4) / args.upscale).astype(np.int64)
        scores = np.asarray(weights, dtype=np.float64).reshape(-1)
        n_raw += len(boxes)
        kept = filter_boxes(boxes, scores, (fh, fw), min_score=args.min_score, aspect=tuple(args.aspect),
                            min_height=args.min_height, max_height=args.max_height, nms_iou=args.nms_iou,
                            contain=args.contain)
        n_shape += len(kept)
        if background is not None:
            kept = [i for i in kept if foreground_fraction(frame, background, tuple(boxes[i]),
                                                           args.diff_threshold) >= args.min_foreground]
        n_fg += len(kept)
        this = boxes[kept] if kept else np.zeros((0, 4), dtype=np.int64)
        if len(prev) and len(this):
            iou, _ = iou_matrix(this, prev)
            novel = iou.max(axis=1) < args.dedup_iou
        else:
            novel = np.ones(len(this), dtype=bool)
        for i, is_new in zip(kept, novel):
            if is_new:
                box = tuple(int(v) for v in boxes[i])
                found.append((idx, box, float(scores[i])))
                x, y, w, h = box
                crops[(idx, box)] = frame[y:y + h, x:x + w].copy()
        prev = this
        progress.set_postfix(crops=len(found), refresh=False)
    progress.close()
    cap.release()

    if len(found) > args.max_crops:
        rng = np.random.default_rng(args.seed)
        pick = np.sort(rng.choice(len(found), size=args.max_crops, replace=False))
        selected = [found[i] for i in pick]
    else:
        selected = found

    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.iterdir():
        if CROP_NAME.match(old.name):
            old.unlink()
    rows = []
    for frame_idx, box, score in selected:
        name = crop_name(frame_idx, box)
        if not cv2.imwrite(str(args.out / name), crops[(frame_idx, box)],
                           [cv2.IMWRITE_JPEG_QUALITY, int(args.quality)]):
            sys.exit(f"error: {args.out / name}: could not write")
        rows.append((name, frame_idx, *box, f"{score:.3f}"))
    with open(args.out / "crops.csv", "w", newline="") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(["file", "frame", "x", "y", "w", "h", "score"])
        wr.writerows(rows)
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"{n_raw} raw detections, {n_shape} well-shaped, {n_fg} on moving pixels, {len(found)} after "
          f"de-duplication; wrote {len(rows)} crops to {args.out} ({size / 1e6:.2f} MB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
