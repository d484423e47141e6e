"""Compiled CPU kernels of the batched multi-crop path (:class:`partreid.pass_pretrain.augment.DeviceMultiCrop`
when the batch is on the CPU).

On a GPU the batched torch operations of :mod:`partreid.pass_pretrain.augment` are fast; on a CPU each of them is a
full pass over every view of the batch (the exact HSV hue shift alone is about fifteen), and memory traffic, not
arithmetic, bounds the throughput. These kernels compute the same views in three passes, one view per numba thread
and one output row at a time:

1. :func:`resample_views`: crop + resize + flip straight from the uint8 batch, as ``torchvision.ops.roi_align``
   (``aligned=True``, adaptive sampling grid) computes it, written as separable taps (:func:`axis_taps`), plus each
   view's mean colour (the contrast adjustment needs it);
2. :func:`jitter_views`: the first affine colour map, the clip to [0, 1] and the HSV hue shift, plus the mean
   colour after it;
3. :func:`finish_views`: the second affine colour map (the adjustments after the hue step, grayscale), the clip,
   the separable Gaussian blur with edges extended, solarize and the mean/std normalisation.

The affine maps, blur taps and random parameters come from :mod:`partreid.pass_pretrain.augment`, so both
implementations draw and apply the same augmentation; the tests compare them pixel for pixel (within float32
rounding). Kernels are compiled on first use and cached (:mod:`partreid.common.compiled`).
"""

from __future__ import annotations

import math

import numpy as np

from partreid.common.compiled import numba


@numba.njit(cache=True)
def axis_taps(start, length, out_n, size, idx, weight):
    """Separable form of ``roi_align``'s sampling along one axis (torchvision ``ops/cpu/roi_align_kernel.cpp``,
    ``pre_calc_for_bilinear_interpolate``; ``aligned=True``, ``sampling_ratio=-1``).

    Output cell ``o`` averages ``grid = ceil(length / out_n)`` bilinear samples at
    ``start + o·bin + (g + 0.5)·bin/grid`` (``bin = length / out_n``); a sample outside [−1, size] counts as 0,
    one below 0 is moved to 0, one at or past ``size − 1`` reads the last pixel. Because the 2-D sample is the
    product of its row and column weights and the grid is a product of the two axes' grids, the 2-D average is
    the row taps applied after the column taps.

    Args:
        start: the region's first coordinate minus 0.5 (pixels); length: its extent (pixels).
        out_n: output cells; size: input extent (pixels, the padded batch's).
        idx: int64 (out_n, ≥ 2·grid) filled with input indices; weight: float32 (out_n, ≥ 2·grid) with their
            weights (0 for an empty sample).

    Returns:
        int: taps per output cell (2·grid).
    """
    grid = int(math.ceil(length / out_n)) if length > 0 else 0
    bin_ = length / out_n
    for o in range(out_n):
        for g in range(grid):
            pos = start + o * bin_ + (g + 0.5) * bin_ / grid
            t = 2 * g
            if pos < -1.0 or pos > size:
                idx[o, t] = 0
                idx[o, t + 1] = 0
                weight[o, t] = 0.0
                weight[o, t + 1] = 0.0
                continue
            if pos <= 0.0:
                pos = 0.0
            lo = int(pos)
            if lo >= size - 1:
                lo = size - 1
                hi = lo
                pos = float(lo)
            else:
                hi = lo + 1
            frac = pos - lo
            idx[o, t] = lo
            idx[o, t + 1] = hi
            weight[o, t] = (1.0 - frac) / grid
            weight[o, t + 1] = frac / grid
    return 2 * grid


@numba.njit(parallel=True, cache=True)
def resample_views(images, src, rois, flip, out, sums):
    """Crop, resize and flip every view from the uint8 batch (values scaled to [0, 1]).

    Args:
        images: uint8 (B, H, W, 3), the padded batch. src: int64 (n,) the image of each view.
        rois: float64 (n, 4) regions ``(x1, y1, x2, y2)`` in the batch's pixels (roi_align's box convention).
        flip: bool (n,) mirror the view left-right.
        out: float32 (n, 3, h, w), written. sums: float64 (n, 3), written: per-channel sums of each view.
    """
    n, _, oh, ow = out.shape
    height, width = images.shape[1], images.shape[2]
    for v in numba.prange(n):
        x1, y1, x2, y2 = rois[v, 0], rois[v, 1], rois[v, 2], rois[v, 3]
        gy = max(int(math.ceil((y2 - y1) / oh)), 1)
        gx = max(int(math.ceil((x2 - x1) / ow)), 1)
        yi = np.zeros((oh, 2 * gy), np.int64)
        yw = np.zeros((oh, 2 * gy), np.float32)
        xi = np.zeros((ow, 2 * gx), np.int64)
        xw = np.zeros((ow, 2 * gx), np.float32)
        ty = axis_taps(y1 - 0.5, y2 - y1, oh, height, yi, yw)
        tx = axis_taps(x1 - 0.5, x2 - x1, ow, width, xi, xw)
        c0, c1 = width, 0
        for p in range(ow):
            for t in range(tx):
                if xw[p, t] != 0.0:
                    c0 = min(c0, xi[p, t])
                    c1 = max(c1, xi[p, t] + 1)
        span = max(c1 - c0, 0)
        row = np.zeros((3, max(span, 1)), np.float32)
        b = src[v]
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        for o in range(oh):
            row[:, :] = 0.0
            for t in range(ty):
                wt = yw[o, t]
                if wt == 0.0:
                    continue
                r = yi[o, t]
                for c in range(span):
                    row[0, c] += wt * np.float32(images[b, r, c0 + c, 0])
                    row[1, c] += wt * np.float32(images[b, r, c0 + c, 1])
                    row[2, c] += wt * np.float32(images[b, r, c0 + c, 2])
            for p in range(ow):
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                for t in range(tx):
                    wt = xw[p, t]
                    if wt == 0.0:
                        continue
                    c = xi[p, t] - c0
                    a0 += wt * row[0, c]
                    a1 += wt * row[1, c]
                    a2 += wt * row[2, c]
                q = ow - 1 - p if flip[v] else p
                a0 /= np.float32(255.0)
                a1 /= np.float32(255.0)
                a2 /= np.float32(255.0)
                out[v, 0, o, q] = a0
                out[v, 1, o, q] = a1
                out[v, 2, o, q] = a2
                s0 += a0
                s1 += a1
                s2 += a2
        sums[v, 0] = s0
        sums[v, 1] = s1
        sums[v, 2] = s2


@numba.njit(inline="always")
def _affine_clip_row(r, g, b, A, bias, v):
    """In place on one row of the three planes: ``clip(A[v]·rgb + bias[v], 0, 1)``."""
    zero, one = np.float32(0.0), np.float32(1.0)
    for p in range(r.size):
        x0, x1, x2 = r[p], g[p], b[p]
        r[p] = min(max(A[v, 0, 0] * x0 + A[v, 0, 1] * x1 + A[v, 0, 2] * x2 + bias[v, 0], zero), one)
        g[p] = min(max(A[v, 1, 0] * x0 + A[v, 1, 1] * x1 + A[v, 1, 2] * x2 + bias[v, 1], zero), one)
        b[p] = min(max(A[v, 2, 0] * x0 + A[v, 2, 1] * x1 + A[v, 2, 2] * x2 + bias[v, 2], zero), one)


@numba.njit(parallel=True, cache=True, fastmath=True)
def jitter_views(x, A, bias, jitter, hue, sums):
    """In place: ``clip(A·rgb + b, 0, 1)`` then, for views with ``jitter``, the HSV hue shift by ``hue`` turns
    (the formula of :func:`partreid.pass_pretrain.augment.hue_shift`); ``sums`` (n, 3) float64 receives the
    per-channel sums after it.

    Args:
        x: float32 (n, 3, h, w). A: float32 (n, 3, 3); bias: float32 (n, 3). jitter: bool (n,); hue: float32 (n,).
    """
    n, _, oh, ow = x.shape
    six, four, two, one, zero = (np.float32(6.0), np.float32(4.0), np.float32(2.0), np.float32(1.0),
                                 np.float32(0.0))
    for v in numba.prange(n):
        shift = six * hue[v]
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        for o in range(oh):
            r, g, b = x[v, 0, o], x[v, 1, o], x[v, 2, o]
            _affine_clip_row(r, g, b, A, bias, v)
            if jitter[v]:
                for p in range(ow):
                    rp, gp, bp = r[p], g[p], b[p]
                    maxc = max(max(rp, gp), bp)
                    minc = min(min(rp, gp), bp)
                    span = maxc - minc
                    inv = one / max(span, np.float32(1e-12))
                    inv = inv if span > zero else zero
                    h_r = (gp - bp) * inv
                    h_g = (bp - rp) * inv + two
                    h_b = (rp - gp) * inv + four
                    h6 = (h_r if maxc == rp else (h_g if maxc == gp else h_b)) + shift
                    k = np.float32(5.0) + h6
                    k = k - six * np.floor(k / six)
                    r[p] = maxc - span * min(max(min(k, four - k), zero), one)
                    k = np.float32(3.0) + h6
                    k = k - six * np.floor(k / six)
                    g[p] = maxc - span * min(max(min(k, four - k), zero), one)
                    k = one + h6
                    k = k - six * np.floor(k / six)
                    b[p] = maxc - span * min(max(min(k, four - k), zero), one)
            for p in range(ow):
                s0 += r[p]
                s1 += g[p]
                s2 += b[p]
        sums[v, 0] = s0
        sums[v, 1] = s1
        sums[v, 2] = s2


@numba.njit(parallel=True, cache=True, fastmath=True)
def finish_views(x, A, bias, blur, taps, solarize, threshold, scale, offset):
    """In place: ``clip(A·rgb + b, 0, 1)``; for views with ``blur`` the separable Gaussian blur with taps
    ``taps[v]`` (2R+1 weights, edges extended, vertical then horizontal as
    :func:`partreid.pass_pretrain.augment.gaussian_blur`); for views with ``solarize`` ``x → 1 − x`` where
    ``x ≥ threshold``; then ``x·scale + offset`` per channel (the mean/std normalisation).

    Args:
        x: float32 (n, 3, h, w). A: float32 (n, 3, 3); bias: float32 (n, 3). blur, solarize: bool (n,).
        taps: float32 (n, 2R+1). threshold: float32. scale, offset: float32 (3,).
    """
    n, _, oh, ow = x.shape
    radius = (taps.shape[1] - 1) // 2
    one = np.float32(1.0)
    for v in numba.prange(n):
        for o in range(oh):
            _affine_clip_row(x[v, 0, o], x[v, 1, o], x[v, 2, o], A, bias, v)
        if blur[v]:
            tmp = np.empty((oh, ow), np.float32)
            padded = np.empty(ow + 2 * radius, np.float32)
            for c in range(3):
                plane = x[v, c]
                for o in range(oh):  # vertical: rows o−R … o+R, edges extended
                    out = tmp[o]
                    out[:] = 0.0
                    for t in range(-radius, radius + 1):
                        wt = taps[v, t + radius]
                        src = plane[min(max(o + t, 0), oh - 1)]
                        for p in range(ow):
                            out[p] += wt * src[p]
                for o in range(oh):  # horizontal, on an edge-extended copy of the row
                    row = tmp[o]
                    padded[radius:radius + ow] = row
                    padded[:radius] = row[0]
                    padded[radius + ow:] = row[ow - 1]
                    out = plane[o]
                    out[:] = 0.0
                    for t in range(2 * radius + 1):
                        wt = taps[v, t]
                        for p in range(ow):
                            out[p] += wt * padded[p + t]
        sol = solarize[v]
        for c in range(3):
            sc, off = scale[c], offset[c]
            for o in range(oh):
                row = x[v, c, o]
                if sol:
                    for p in range(ow):
                        y = row[p]
                        row[p] = (one - y if y >= threshold else y) * sc + off
                else:
                    for p in range(ow):
                        row[p] = row[p] * sc + off
