"""Device-side PASS multi-crop (pass_pretrain/augment.py ``DeviceMultiCrop``) against the PIL path
(``PassMultiCropAugment``), on the CPU.

Random parameters are compared statistically with what the PIL path draws (torchvision's own ``get_params``,
fixed seeds, so the tests are deterministic); the band geometry and the crop placement are checked exactly; the
pixel operations are compared with Pillow/torchvision on chosen parameters.
"""

import io
import math
from itertools import permutations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from partreid.common.data import load_dataset
from partreid.common.data.decode import decode_bounded
from partreid.common.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageDataset
from partreid.pass_pretrain.augment import (RECIPE, AugmentRecipe, DecodedImages, DeviceMultiCrop,
                                            PassMultiCropAugment, RandomPILGaussianBlur, UInt8Batch, band_boxes,
                                            collate_uint8, color_pipeline, device_views, gaussian_blur,
                                            sample_color_params, sample_crop_boxes)
from partreid.pass_pretrain.train import PassConfig, train_pass

P_MIN = 1e-3  # KS / chi-square p-value below which two samples are declared different


def torchvision_boxes(h, w, scale, n, seed):
    torch.manual_seed(seed)
    img = torch.empty(1, h, w)
    return np.array([T.RandomResizedCrop.get_params(img, list(scale), list(RECIPE.ratio)) for _ in range(n)])


@pytest.mark.parametrize("h,w,scale", [(256, 128, (0.4, 1.0)), (117, 59, (0.4, 1.0)), (58, 59, (0.1, 0.8)),
                                       (300, 40, (0.4, 1.0)), (64, 128, (0.1, 0.8))])
def test_crop_boxes_have_torchvision_distribution(h, w, scale):
    n = 3000
    ref = torchvision_boxes(h, w, scale, n, seed=h * 1000 + w)  # rows (top, left, h, w)
    gen = torch.Generator().manual_seed(7)
    got = sample_crop_boxes(torch.full((n,), h), torch.full((n,), w), scale, RECIPE.ratio, gen).numpy()
    assert (got[:, 2] >= 1).all() and (got[:, 3] >= 1).all()
    assert (got[:, 0] + got[:, 2] <= h).all() and (got[:, 1] + got[:, 3] <= w).all() and (got[:, :2] >= 0).all()
    for name, a, b in [("top", ref[:, 0], got[:, 0]), ("left", ref[:, 1], got[:, 1]), ("h", ref[:, 2], got[:, 2]),
                       ("w", ref[:, 3], got[:, 3]), ("area", ref[:, 2] * ref[:, 3], got[:, 2] * got[:, 3]),
                       ("ratio", ref[:, 3] / ref[:, 2], got[:, 3] / got[:, 2])]:
        p = stats.ks_2samp(a, b).pvalue
        assert p > P_MIN, f"{name}: KS p={p:.2g} for {h}x{w} scale {scale}"
    # the central-crop fallback happens as often (it is the only box of its exact size and place)
    fb_ref = np.mean((ref[:, 0] == (h - ref[:, 2]) // 2) & (ref[:, 1] == (w - ref[:, 3]) // 2))
    fb_got = np.mean((got[:, 0] == (h - got[:, 2]) // 2) & (got[:, 1] == (w - got[:, 3]) // 2))
    assert abs(fb_ref - fb_got) < 4 * math.sqrt(max(fb_ref * (1 - fb_ref), 1e-4) / n) + 0.01


def test_a_wrong_distribution_is_detected():
    """The KS comparison above can fail: a scale range off by 0.05 is caught."""
    n = 3000
    ref = torchvision_boxes(256, 128, (0.4, 1.0), n, seed=1)
    gen = torch.Generator().manual_seed(7)
    got = sample_crop_boxes(torch.full((n,), 256), torch.full((n,), 128), (0.45, 1.0), RECIPE.ratio, gen).numpy()
    assert stats.ks_2samp(ref[:, 2] * ref[:, 3], got[:, 2] * got[:, 3]).pvalue < P_MIN


def test_pil_path_uses_the_same_recipe():
    aug = PassMultiCropAugment()
    rrc, flip_color = aug.global1.transforms[0], aug.global1.transforms[1]
    flip, jitter_apply, gray = flip_color.transforms
    jitter = jitter_apply.transforms[0]
    b, c, s, h = RECIPE.jitter
    assert rrc.scale == (0.4, 1.0) and tuple(rrc.ratio) == RECIPE.ratio and flip.p == RECIPE.flip_p
    assert aug.local.transforms[0].scale == (0.1, 0.8)
    assert jitter_apply.p == RECIPE.jitter_p and gray.p == RECIPE.gray_p
    assert jitter.brightness == (1 - b, 1 + b) and jitter.contrast == (1 - c, 1 + c)
    assert jitter.saturation == (1 - s, 1 + s) and jitter.hue == (-h, h)
    blurs = [aug.global1.transforms[2], aug.global2.transforms[2], aug.local.transforms[2]]
    assert all(isinstance(x, RandomPILGaussianBlur) for x in blurs)
    assert tuple(x.p for x in blurs) == RECIPE.blur_p
    assert all((x.radius_min, x.radius_max) == RECIPE.blur_radius for x in blurs)
    sol = aug.global2.transforms[3]
    assert sol.p == RECIPE.solarize_p and sol.threshold == RECIPE.solarize_threshold


def test_color_params_match_the_pil_path():
    n = 20000
    gen = torch.Generator().manual_seed(3)
    blur_p = torch.tensor([1.0, 0.1, 0.5]).repeat(n // 2 + 1)[:n]
    sol_p = torch.tensor([0.0, 0.2]).repeat(n // 2)
    p = sample_color_params(n, gen, torch.device("cpu"), blur_p, sol_p)

    def near(frac, prob, m):
        assert abs(float(frac) - prob) <= 4 * math.sqrt(prob * (1 - prob) / m) + 1e-9, (float(frac), prob)

    near(p["flip"].float().mean(), RECIPE.flip_p, n)
    near(p["jitter"].float().mean(), RECIPE.jitter_p, n)
    near(p["gray"].float().mean(), RECIPE.gray_p, n)
    for prob in (1.0, 0.1, 0.5):
        sel = blur_p == prob
        near(p["blur"][sel].float().mean(), prob, int(sel.sum()))
    assert not p["solarize"][sol_p == 0].any()
    near(p["solarize"][sol_p == 0.2].float().mean(), 0.2, n // 2)
    # jitter factors and their order, against ColorJitter.get_params (the PIL path's draws)
    b, c, s, h = RECIPE.jitter
    torch.manual_seed(11)
    ref = [T.ColorJitter.get_params((1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h)) for _ in range(4000)]
    for k, name in enumerate(["brightness", "contrast", "saturation", "hue"], start=1):
        pv = stats.ks_2samp([r[k] for r in ref], p[name].numpy()).pvalue
        assert pv > P_MIN, f"{name}: KS p={pv:.2g}"
    perm_index = {q: i for i, q in enumerate(permutations(range(4)))}
    got_counts = np.bincount([perm_index[tuple(o)] for o in p["order"].tolist()], minlength=24)
    ref_counts = np.bincount([perm_index[tuple(r[0].tolist())] for r in ref], minlength=24)
    assert stats.chi2_contingency(np.stack([got_counts, ref_counts])).pvalue > P_MIN
    # blur radius uniform on the PIL path's range
    lo, hi = RECIPE.blur_radius
    assert stats.kstest(p["sigma"].numpy(), stats.uniform(lo, hi - lo).cdf).pvalue > P_MIN


@pytest.mark.parametrize("H,W", [(256, 128), (117, 59), (101, 37), (9, 5)])
def test_band_geometry_is_the_pil_paths(H, W):
    aug = DeviceMultiCrop()
    n = 400
    gen = torch.Generator().manual_seed(H)
    _, local = aug.boxes(torch.tensor([[H, W]] * n), gen)  # (bands, per band, n, 4)
    for k, (left, top, right, bottom) in enumerate(band_boxes(H, W)):
        bx = local[k].reshape(-1, 4)
        assert (bx[:, 0] >= top).all() and (bx[:, 0] + bx[:, 2] <= bottom).all()
        assert (bx[:, 1] >= left).all() and (bx[:, 1] + bx[:, 3] <= right).all()
        # the crops reach both edges of the band: the band is exactly the PIL path's
        assert int(bx[:, 0].min()) == top and int((bx[:, 0] + bx[:, 2]).max()) == bottom
    assert [(0, t, W, t + int(0.5 * H)) for t in (0, int(0.25 * H), int(0.5 * H))] == band_boxes(H, W)


def no_color_aug(**kw):
    recipe = AugmentRecipe(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)
    return DeviceMultiCrop(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), recipe=recipe, **kw)


def test_views_show_the_boxes_also_after_a_bounded_decode():
    """Pixel (r, c) of a 200x80 image codes its row and column; every output pixel of a view must come from
    inside its crop box, whether the image was decoded at full size or at half size."""
    H, W = 200, 80
    rows = np.repeat(np.arange(H)[:, None], W, 1)
    cols = np.repeat(np.arange(W)[None, :], H, 0)
    img = np.stack([rows, cols * 3, np.zeros_like(rows)], axis=2).astype(np.uint8)
    half = np.asarray(Image.fromarray(img).resize((W // 2, H // 2), Image.Resampling.BOX))
    aug = no_color_aug()
    for arr in (img, half):
        batch = collate_uint8([((arr, (H, W)), 0), ((arr, (H, W)), 1)])
        views = aug(batch, torch.Generator().manual_seed(5))
        g_boxes, l_boxes = aug.boxes(batch.full_sizes, torch.Generator().manual_seed(5))
        boxes = torch.cat([g_boxes, l_boxes.reshape(-1, 2, 4)])
        slack = 1.5 if arr is img else 3.0  # bilinear border + half-resolution pixels
        for v, view in enumerate(views):
            for b in range(2):
                top, left, h, w = boxes[v, b].tolist()
                r = view[b, 0].numpy() * 255
                c = view[b, 1].numpy() * 255 / 3
                assert r.min() >= top - slack and r.max() <= top + h - 1 + slack, (v, b)
                assert c.min() >= left - slack and c.max() <= left + w - 1 + slack, (v, b)
                if arr is img and h >= view.shape[2] and w >= view.shape[3]:  # shrinking: spans the box
                    assert r.min() <= top + 1 + h / view.shape[2] and r.max() >= top + h - 2 - h / view.shape[2]


def pil_vs_device(pil_fn, params, img):
    """Apply one PIL op and the device colour pipeline with ``params`` to ``img`` (uint8 HxWx3); both as floats."""
    want = np.asarray(pil_fn(Image.fromarray(img))).astype(np.float64) / 255
    x = torch.from_numpy(img).permute(2, 0, 1).float().unsqueeze(0) / 255
    off = torch.tensor([False])
    params = dict(params, flip=off, blur=off, solarize=off, sigma=torch.tensor([1.0]))
    got = color_pipeline(x, params, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 0.5)[0].permute(1, 2, 0).numpy()
    return want, got


def one_param(op=None, factor=1.0, gray=False):
    p = {"jitter": torch.tensor([op is not None]), "gray": torch.tensor([gray]),
         "brightness": torch.tensor([factor]), "contrast": torch.tensor([factor]),
         "saturation": torch.tensor([factor]), "hue": torch.tensor([factor]),
         "order": torch.tensor([[op if op is not None else 0] + [k for k in range(4) if k != op][:3]])}
    if op is not None:  # the other three adjustments get neutral factors
        for k, name in enumerate(["brightness", "contrast", "saturation", "hue"]):
            if k != op:
                p[name] = torch.tensor([0.0 if name == "hue" else 1.0])
    return p


def test_colour_ops_match_pillow():
    rng = np.random.default_rng(0)
    img = rng.integers(60, 200, size=(32, 16, 3), dtype=np.uint8)  # no clipping for these factors
    cases = [(lambda im: TF.adjust_brightness(im, 1.3), one_param(0, 1.3)),
             (lambda im: TF.adjust_contrast(im, 0.7), one_param(1, 0.7)),
             (lambda im: TF.adjust_saturation(im, 1.2), one_param(2, 1.2)),
             (lambda im: TF.rgb_to_grayscale(im, 3), one_param(gray=True))]
    for fn, params in cases:
        want, got = pil_vs_device(fn, params, img)
        assert np.abs(want - got).max() <= 1.5 / 255
    # hue: the HSV shift (PIL stores H, S, V in uint8, hence the tolerance), and two adjustments in a row
    img = rng.integers(0, 256, size=(32, 16, 3), dtype=np.uint8)
    for shift in (0.05, -0.1):
        want, got = pil_vs_device(lambda im: TF.adjust_hue(im, shift), one_param(3, shift), img)
        assert np.abs(want - got).mean() < 2 / 255  # PIL: hue in 1/255 turns, factor rounded to them
        exact = TF.adjust_hue(torch.from_numpy(img).permute(2, 0, 1).float() / 255, shift).permute(1, 2, 0).numpy()
        assert np.abs(exact - got).max() < 1e-4  # torchvision's float HSV shift
    p = one_param(3, 0.08)
    p["brightness"], p["order"] = torch.tensor([0.8]), torch.tensor([[3, 0, 1, 2]])
    want, got = pil_vs_device(lambda im: TF.adjust_brightness(TF.adjust_hue(im, 0.08), 0.8), p, img)
    assert np.abs(want - got).mean() < 1.5 / 255
    # blur: PIL's box-blur approximation of the same Gaussian
    img = rng.integers(0, 256, size=(40, 24, 3), dtype=np.uint8)
    for sigma in (0.5, 1.5):
        want = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(sigma))).astype(np.float64) / 255
        x = torch.from_numpy(img).permute(2, 0, 1).float().unsqueeze(0) / 255
        got = gaussian_blur(x, torch.tensor([sigma]))[0].permute(1, 2, 0).numpy()
        assert np.abs(want - got).mean() < 2.5 / 255


@pytest.mark.parametrize("recipe", [RECIPE, AugmentRecipe(flip_p=0.5, jitter_p=0.5, gray_p=0.5, blur_p=(0.5, 0.5, 0.5),
                                                           solarize_p=0.5, blur_radius=(0.1, 3.0))],
                         ids=["PASS recipe", "every branch half the time"])
def test_compiled_cpu_views_equal_the_torch_operations(recipe):
    """On the CPU the views come from three compiled passes (pass_pretrain/augment_cpu.py); they must be the
    views of the batched torch operations (``roi_align`` + :func:`color_pipeline`, the path a GPU runs) for the
    same random draws: images of several sizes in one padded batch, decoded at full and at reduced size,
    shrinking and enlarging crops, with and without flip, jitter, grayscale, blur and solarize."""
    rng = np.random.default_rng(11)
    items = []
    for i, (h, w) in enumerate([(160, 64), (97, 41), (300, 120), (40, 90), (128, 64), (64, 20)]):
        full = (h * 2, w * 2) if i % 2 else (h, w)  # odd items: decoded at half of their full size
        items.append(((rng.integers(0, 256, (h, w, 3), dtype=np.uint8), full), i))
    batch = collate_uint8(items)
    compiled = DeviceMultiCrop(global_size=(96, 48), local_size=(48, 24), recipe=recipe)
    reference = DeviceMultiCrop(global_size=(96, 48), local_size=(48, 24), recipe=recipe, cpu_kernels=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    thr = recipe.solarize_threshold / 255.0
    for seed in range(3):
        got = device_views(compiled, batch, torch.device("cpu"), seed)
        want = device_views(reference, batch, torch.device("cpu"), seed)
        assert [g.shape for g in got] == [w.shape for w in want]
        for v, (g, w) in enumerate(zip(got, want)):
            g01, w01 = g * std + mean, w * std + mean  # back to [0, 1] pixel values
            off = (g01 - w01).abs() > 1e-4  # 0.03 of a grey level
            # float rounding may only flip a pixel sitting on the solarize threshold (1 - x on one side)
            on_edge = ((w01 - thr).abs() < 1e-4) | ((w01 - (1 - thr)).abs() < 1e-4)
            assert not bool((off & ~on_edge).any()), f"seed {seed} view {v}: {float((g01 - w01).abs().max())}"
    # the comparison can fail: another seed gives other views
    other = device_views(reference, batch, torch.device("cpu"), 99)
    assert float((got[0] - other[0]).abs().max()) > 0.1


def test_views_shapes_normalisation_and_reproducibility():
    rng = np.random.default_rng(1)
    items = [((rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), (h, w)) for h, w in [(120, 50), (90, 70)]]
    batch = collate_uint8([(it, i) for i, it in enumerate(items)] + [None])
    assert batch.images.shape == (2, 120, 70, 3) and batch.indices.tolist() == [0, 1]
    # padding repeats the last row / column
    assert torch.equal(batch.images[1, 90:, :70], batch.images[1, 89:90, :70].expand(30, 70, 3))
    aug = DeviceMultiCrop(global_size=(64, 32), local_size=(32, 16))
    v1 = device_views(aug, batch, torch.device("cpu"), seed=4)
    v2 = device_views(aug, batch, torch.device("cpu"), seed=4)
    v3 = device_views(aug, batch, torch.device("cpu"), seed=5)
    assert len(v1) == 11 and [tuple(v.shape) for v in v1] == [(2, 3, 64, 32)] * 2 + [(2, 3, 32, 16)] * 9
    assert all(torch.equal(a, b) for a, b in zip(v1, v2)) and not torch.equal(v1[0], v3[0])
    lo = (0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    hi = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    for v in v1:
        for ch in range(3):
            assert float(v[:, ch].min()) >= lo[ch] - 1e-5 and float(v[:, ch].max()) <= hi[ch] + 1e-5


def test_bounded_decode_and_the_worker_side(tmp_path):
    rng = np.random.default_rng(2)
    big = rng.integers(0, 256, size=(400, 160, 3), dtype=np.uint8)
    (tmp_path / "lup" / "a").mkdir(parents=True)
    Image.fromarray(big).save(tmp_path / "lup" / "a" / "big.jpg", quality=95)
    Image.fromarray(big[:100, :40]).save(tmp_path / "lup" / "a" / "small.png")
    (tmp_path / "lup" / "a" / "bad.jpg").write_bytes(b"not a jpeg")
    arr, full = decode_bounded(tmp_path / "lup" / "a" / "big.jpg", "big", max_height=100)
    assert full == (400, 160) and arr.shape == (100, 40, 3) and arr.dtype == np.uint8
    ref = np.asarray(Image.open(tmp_path / "lup" / "a" / "big.jpg").convert("RGB").resize((40, 100), Image.BOX))
    assert np.abs(arr.astype(int) - ref).mean() < 6  # DCT-scaled decode ~ full decode then box shrink
    arr, full = decode_bounded(io.BytesIO((tmp_path / "lup" / "a" / "small.png").read_bytes()), "small", 100)
    assert full == (100, 40) and np.array_equal(arr, big[:100, :40])
    with pytest.raises(OSError, match="bad"):
        decode_bounded(tmp_path / "lup" / "a" / "bad.jpg", "bad", 100)
    import os
    os.environ["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    ds = load_dataset(f"luperson:{tmp_path / 'lup'}", verbose=False)
    dec = DecodedImages(ImageDataset(ds), max_height=100)
    items = [dec[i] for i in range(len(dec))]  # sorted: bad.jpg, big.jpg, small.png
    assert items[0] is None and dec.images.skipped == 1
    assert items[1][0][0].shape == (100, 40, 3) and items[1][0][1] == (400, 160) and items[2][1] == 2
    del os.environ["XDG_CACHE_HOME"]


def test_train_pass_runs_with_device_augmentation(tmp_path):
    class Images:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            rng = np.random.default_rng(i)
            return Image.fromarray(rng.integers(0, 256, (96, 40, 3), dtype=np.uint8)), i

    cfg = PassConfig(arch="vit_tiny", depth=1, image_size=(64, 32), local_size=(32, 16), out_dim=32,
                     hidden_dim=32, bottleneck_dim=16, batch_size=2, epochs=1, warmup_epochs=0, num_workers=0,
                     progress=False, checkpoint_every=0, export_on_finish=False, augment_on="device")
    ckpt = train_pass(cfg, Images(), tmp_path / "run")
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert ckpt.is_file() and len(rows) == 3 and all(math.isfinite(float(r.split(",")[2])) for r in rows[1:])
