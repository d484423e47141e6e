"""PPLR's random erasing (uniform aspect ratio, 100 tries) against a grid integration and torchvision's law."""

import numpy as np
import torch

from partreid.pplr_finetune.transforms import ReferenceRandomErasing, train_transform

H, W = 384, 128
N = 5000


def _grid_mean_area(uniform_ratio: bool, n: int = 600) -> float:
    """E[erased fraction | a box fits] by midpoint integration over (area fraction, aspect) (independent of the
    class: the accepted draw of a retry loop is distributed as one draw conditioned on fitting)."""
    s = 0.02 + (0.4 - 0.02) * (np.arange(n) + 0.5) / n
    if uniform_ratio:
        r = 0.3 + (1 / 0.3 - 0.3) * (np.arange(n) + 0.5) / n
    else:
        r = np.exp(np.log(0.3) + (np.log(1 / 0.3) - np.log(0.3)) * (np.arange(n) + 0.5) / n)
    ss, rr = np.meshgrid(s, r)
    h = np.round(np.sqrt(ss * H * W * rr))
    w = np.round(np.sqrt(ss * H * W / rr))
    ok = (h < H) & (w < W)
    return float((h * w / (H * W))[ok].mean())


def test_mean_erased_area_is_pplrs_not_torchvisions():
    ours_expected, tv_expected = _grid_mean_area(True), _grid_mean_area(False)
    assert abs(ours_expected - 0.198) < 0.002 and abs(tv_expected - 0.179) < 0.002
    g = torch.Generator().manual_seed(0)
    erase = ReferenceRandomErasing(p=1.0)
    areas = []
    for _ in range(N):
        box = erase.get_params(H, W, generator=g)
        assert box is not None
        top, left, h, w = box
        assert 0 <= top <= H - h and 0 <= left <= W - w and h < H and w < W
        areas.append(h * w / (H * W))
    areas = np.asarray(areas)
    se = areas.std() / np.sqrt(N)
    assert abs(areas.mean() - ours_expected) < 4 * se, (areas.mean(), ours_expected, se)
    assert abs(areas.mean() - tv_expected) > 8 * se  # the torchvision law is clearly rejected


def test_erasing_fills_one_box_with_the_mean_in_the_normalised_tensor():
    torch.manual_seed(3)
    erase = ReferenceRandomErasing(p=1.0, value=(0.485, 0.456, 0.406))
    img = torch.full((3, 64, 32), 7.0)
    out = erase(img)
    for c, v in enumerate((0.485, 0.456, 0.406)):
        mask = out[c] != 7.0
        assert torch.allclose(out[c][mask], torch.tensor(v))
        rows, cols = torch.nonzero(mask, as_tuple=True)
        assert mask.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # one rectangle
    assert torch.equal(ReferenceRandomErasing(p=0.0)(torch.ones(3, 8, 8)), torch.ones(3, 8, 8))


def test_train_transform_output():
    from PIL import Image

    t = train_transform((64, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = t(Image.new("RGB", (40, 90), (128, 20, 200)))
    assert x.shape == (3, 64, 32) and x.dtype == torch.float32
    assert isinstance(t.transforms[-1], ReferenceRandomErasing)
