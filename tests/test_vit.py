"""PartViT: token routing, position resize, checkpoint layouts (PASS ``vision_transformer.py`` ``VisionTransformer``,
PASS ``vision_transformer.py`` ``interpolate_pos_encoding``, PASS ``utils.py`` ``MultiCropWrapper``, PASS
``convert_model_dino.py``, PASS-reID ``TR/model/make_model.py`` ``build_transformer_pass``)."""

import math

import pytest
import torch
import torch.nn.functional as F

from partreid.common.errors import InputError
from partreid.common.models.vit import (META_KEY, build_part_vit, detect_vit_arch, load_part_vit, load_vit_weights,
                               resize_pos_grid, save_backbone)
from partreid.pass_pretrain.augment import CropLayout
from partreid.pass_pretrain.heads import PASSMultiCrop


def official_pass_state(dim: int, depth: int, grid=(16, 8), seed: int = 0) -> dict:
    """A state dict written from the official PASS backbone key list (PASS ``convert_model_dino.py``), independently
    of our model."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {"patch_embed.proj.weight": r(dim, 3, 16, 16), "patch_embed.proj.bias": r(dim),
          "cls_token": r(1, 1, dim), "cls_pos": r(1, 1, dim), "pos_embed": r(1, grid[0] * grid[1], dim),
          "norm.weight": r(dim), "norm.bias": r(dim)}
    for k in (1, 2, 3):
        sd[f"part_token{k}"] = r(1, 1, dim)
        sd[f"part{k}_pos"] = r(1, 1, dim)
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": r(dim), p + "norm1.bias": r(dim),
                   p + "attn.qkv.weight": r(3 * dim, dim), p + "attn.qkv.bias": r(3 * dim),
                   p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
                   p + "norm2.weight": r(dim), p + "norm2.bias": r(dim),
                   p + "mlp.fc1.weight": r(4 * dim, dim), p + "mlp.fc1.bias": r(4 * dim),
                   p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim)})
    return sd


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_part_vit("vit_tiny", depth=2).eval()


def test_sizes_and_attributes():
    for arch, (dim, heads) in {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}.items():
        m = build_part_vit(arch, depth=1)
        assert (m.embed_dim, m.num_heads, m.num_parts, m.image_size) == (dim, heads, 3, (256, 128))
        assert m.pos_embed.shape == (1, 128, dim)
        assert m.blocks[0].norm1.eps == 1e-6 and m.blocks[0].attn.qkv.bias is not None
        assert torch.count_nonzero(m.cls_pos) == 0  # PASS VisionTransformer leaves cls_pos at zero
    m = build_part_vit("vit_tiny", depth=12, drop_path_rate=0.1)
    rates = [0.0 if not hasattr(b.drop_path1, "drop_prob") else b.drop_path1.drop_prob for b in m.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates[6] == pytest.approx(0.1 * 6 / 11)
    with pytest.raises(InputError):
        build_part_vit("vit_huge")


def test_global_and_band_routing_shapes(tiny):
    x = torch.randn(2, 3, 256, 128)
    g = tiny.forward_global_tokens(x)
    assert g.shape == (2, 4, 192)
    cls, parts = tiny(x)
    assert cls.shape == (2, 192) and parts.shape == (2, 3, 192)
    assert torch.equal(cls, g[:, 0]) and torch.equal(parts, g[:, 1:])
    crop = torch.randn(3, 3, 128, 64)
    for band in range(3):
        assert tiny.forward_band(crop, band).shape == (3, 2, 192)
    with pytest.raises(InputError):
        tiny.forward_band(crop, 3)
    with pytest.raises(InputError):
        tiny(torch.randn(1, 3, 250, 128))


def test_band_routing_uses_only_its_part_token():
    """A local crop of band k sees [CLS, PART_{k+1}] only: perturbing PART3 (token or position) changes band 2 and
    the global view, never bands 0 and 1 (PASS ``vision_transformer.py`` ``VisionTransformer``)."""
    torch.manual_seed(1)
    m = build_part_vit("vit_tiny", depth=2).eval()
    crop, x = torch.randn(2, 3, 128, 64), torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        before = [m.forward_band(crop, b) for b in range(3)] + [m.forward_global_tokens(x)]
        m.part_token3.add_(1.0)
        m.part3_pos.add_(0.5)
        after = [m.forward_band(crop, b) for b in range(3)] + [m.forward_global_tokens(x)]
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert not torch.allclose(before[2], after[2])
    assert not torch.allclose(before[3], after[3])


def test_band_output_matches_manual_token_sequence(tiny):
    """forward_band == blocks/norm applied to [cls+cls_pos, part2+part2_pos, patches+resized grid] built by hand."""
    crop = torch.randn(2, 3, 128, 64)
    d = tiny.embed_dim
    with torch.no_grad():
        patches = F.conv2d(crop, tiny.patch_embed.proj.weight, tiny.patch_embed.proj.bias, stride=16)
        patches = patches.flatten(2).transpose(1, 2)  # (B, 8*4, D), row-major
        grid = tiny.pos_embed.reshape(1, 16, 8, d).permute(0, 3, 1, 2)
        pos = F.interpolate(grid, size=(8, 4), mode="bicubic", align_corners=False)
        pos = pos.permute(0, 2, 3, 1).reshape(1, 32, d)
        seq = torch.cat([(tiny.cls_token + tiny.cls_pos).expand(2, -1, -1),
                         (tiny.part_token2 + tiny.part2_pos).expand(2, -1, -1), patches + pos], dim=1)
        for blk in tiny.blocks:
            seq = blk(seq)
        expected = tiny.norm(seq)[:, :2]
        got = tiny.forward_band(crop, 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_position_resize_layout_and_quirk():
    d = 4
    rows = torch.arange(16, dtype=torch.float32).view(1, 16, 1, 1).expand(1, 16, 8, d)
    table = rows.reshape(1, 128, d).contiguous()  # value = row index, constant along width
    out = resize_pos_grid(table, (16, 8), (32, 8)).reshape(32, 8, d)
    assert torch.allclose(out, out[:, :1].expand_as(out))  # still constant along width: row-major layout kept
    assert bool((out[1:, 0, 0] >= out[:-1, 0, 0] - 1e-5).all()) and out[0, 0, 0] < 0.5 and out[-1, 0, 0] > 14.5
    assert torch.equal(resize_pos_grid(table, (16, 8), (16, 8)), table)  # explicit size: exact identity
    torch.manual_seed(0)
    rand = torch.randn(1, 128, d)
    quirk = resize_pos_grid(rand, (16, 8), (16, 8), pass_scale_quirk=True)
    assert quirk.shape == rand.shape and not torch.equal(quirk, rand)  # "+0.1" shifts by a fraction of a cell
    assert (quirk - rand).abs().mean() < 0.5 * rand.abs().mean()
    assert resize_pos_grid(rand, (16, 8), (8, 4), pass_scale_quirk=True).shape == (1, 32, d)


def test_official_layout_load_and_export_round_trip(tmp_path):
    sd = official_pass_state(384, 12)
    model, report = load_part_vit({"module.backbone." + k: v for k, v in sd.items()})
    assert (model.arch, model.depth, report.source_format, report.loaded) == ("vit_small", 12, "pass", len(sd))
    assert set(model.state_dict()) == set(sd)
    out = save_backbone(model, tmp_path / "backbone.pth")
    saved = torch.load(out, map_location="cpu", weights_only=False)
    meta = saved.pop(META_KEY)
    assert set(saved) == set(sd)
    assert all(torch.equal(saved[k], sd[k]) for k in sd)
    assert meta["arch"] == "vit_small" and meta["image_size"] == [256, 128]
    assert tuple(meta["pixel_mean"]) == pytest.approx((0.485, 0.456, 0.406))
    # the export loads back into the same model (meta read), and a DINO-style training checkpoint holding the
    # teacher with its heads loads as well
    rep2 = load_vit_weights(model, saved | {META_KEY: meta})
    assert rep2.meta["arch"] == "vit_small" and rep2.source_format == "pass"
    small = official_pass_state(384, 2, seed=1)
    dino = {"teacher": {**{"backbone." + k: v for k, v in small.items()}, "head.mlp.0.weight": torch.zeros(2, 2)},
            "student": {}, "epoch": 3}
    third, rep3 = load_part_vit(dino)
    assert (third.arch, third.depth, rep3.source_format) == ("vit_small", 2, "pass-teacher")
    assert "head.mlp.0.weight" in rep3.skipped
    assert all(torch.equal(third.state_dict()[k], small[k]) for k in small)


def test_position_table_resized_on_load_for_384(tmp_path):
    sd = official_pass_state(192, 1)
    model = build_part_vit("vit_tiny", depth=1, image_size=(384, 128))
    report = load_vit_weights(model, sd)
    expected = F.interpolate(sd["pos_embed"].reshape(1, 16, 8, 192).permute(0, 3, 1, 2), size=(24, 8),
                             mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, 192, 192)
    torch.testing.assert_close(model.pos_embed.data, expected)
    assert torch.equal(model.cls_pos.data, sd["cls_pos"]) and any("24x8" in n for n in report.notes)


def test_timm_layout_loading():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    timm_vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=10)
    sd = timm_vit.state_dict()
    assert detect_vit_arch(sd) == "vit_tiny"
    model = build_part_vit("vit_tiny", depth=2)
    report = load_vit_weights(model, sd)
    assert report.source_format == "timm" and "head.weight" in report.skipped
    pos = sd["pos_embed"]  # (1, 1 + 14*14, D)
    assert torch.equal(model.cls_pos.data, pos[:, :1])
    grid = F.interpolate(pos[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2), size=(16, 8), mode="bilinear",
                         align_corners=False).permute(0, 2, 3, 1).reshape(1, 128, 192)
    torch.testing.assert_close(model.pos_embed.data, grid)
    for k in (1, 2, 3):
        assert torch.equal(model.part_token(k).data, sd["cls_token"])
        assert torch.equal(model.part_pos(k).data, pos[:, :1])
    assert torch.equal(model.blocks[1].mlp.fc2.weight.data, sd["blocks.1.mlp.fc2.weight"])


def test_mismatched_checkpoint_gives_one_line_error():
    model = build_part_vit("vit_tiny", depth=2)
    with pytest.raises(InputError) as err:
        load_vit_weights(model, official_pass_state(384, 2))
    msg = str(err.value)
    assert "\n" not in msg and "shape mismatch" in msg and "(1, 1, 384)" in msg
    sd = official_pass_state(192, 2)
    del sd["blocks.1.norm1.weight"]
    sd["blocks.5.attn.qkv.weight"] = torch.zeros(576, 192)
    with pytest.raises(InputError) as err:
        load_vit_weights(model, sd)
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing keys [blocks.1.norm1.weight]" in msg and "unexpected keys [blocks.5.attn.qkv.weight]" in msg
    with pytest.raises(InputError):
        load_vit_weights(model, {"weight": torch.zeros(3)})


def test_detect_arch():
    for arch, dim in (("vit_tiny", 192), ("vit_small", 384), ("vit_base", 768)):
        sd = {"cls_token": torch.zeros(1, 1, dim), "pos_embed": torch.zeros(1, 128, dim),
              "cls_pos": torch.zeros(1, 1, dim)}
        assert detect_vit_arch(sd) == arch
    with pytest.raises(InputError):
        detect_vit_arch({"cls_token": torch.zeros(1, 1, 100), "pos_embed": torch.zeros(1, 4, 100)})


def test_multicrop_wrapper_routing():
    """PASSMultiCrop: one global call with all tokens, one call per band with [CLS, PART_k] (PASS ``utils.py``
    ``MultiCropWrapper``; PASS ``vision_transformer.py`` ``DINOHead``)."""
    torch.manual_seed(0)
    backbone = build_part_vit("vit_tiny", depth=1, image_size=(64, 32))
    layout = CropLayout(2, 3, 3)
    model = PASSMultiCrop(backbone, layout, out_dim=16, hidden_dim=32, bottleneck_dim=8).eval()
    b = 2
    views = [torch.randn(b, 3, 64, 32) for _ in range(2)] + [torch.randn(b, 3, 32, 16) for _ in range(9)]
    calls = []
    orig_band, orig_glob = backbone.forward_band, backbone.forward_global_tokens
    backbone.forward_band = lambda x, band: calls.append(("band", band, x.shape[0])) or orig_band(x, band)
    backbone.forward_global_tokens = lambda x: calls.append(("global", None, x.shape[0])) or orig_glob(x)
    with torch.no_grad():
        out = model(views)
        teacher = model(views[:2])
    assert calls[:4] == [("global", None, 4), ("band", 0, 6), ("band", 1, 6), ("band", 2, 6)]
    assert calls[4:] == [("global", None, 4)]
    assert out.cls.shape == (11 * b, 16) and [p.shape for p in out.parts] == [(5 * b, 16)] * 3
    assert teacher.cls.shape == (2 * b, 16) and [p.shape for p in teacher.parts] == [(2 * b, 16)] * 3
    with torch.no_grad():
        band2 = orig_band(torch.cat(views[8:11]), 2)
        expected_part = model.heads[3](band2[:, 1])
        expected_cls = model.heads[0](band2[:, 0])
    torch.testing.assert_close(out.parts[2][2 * b:], expected_part, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.cls[8 * b:], expected_cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.parts[0][:2 * b], teacher.parts[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError):
        model(views[:10])  # a view missing: refuse rather than mis-route
    with pytest.raises(InputError):
        model(views[:4] + [torch.randn(b, 3, 64, 32)] + views[5:])  # a band group with mixed sizes
    with pytest.raises(InputError):
        PASSMultiCrop(build_part_vit("vit_tiny", depth=1, num_parts=2), layout, out_dim=4, hidden_dim=4,
                      bottleneck_dim=4)
    assert math.isclose(model.heads[0].last_layer.parametrizations.weight.original0.abs().max().item(), 1.0)


def test_set_drop_path_linear_rates():
    from timm.layers import DropPath

    from partreid.common.models.vit import PartViT

    m = PartViT("vit_tiny", depth=4, image_size=(64, 32))
    m.set_drop_path(0.3)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in m.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert isinstance(m.blocks[3].drop_path2, DropPath)
    m.eval()
    x = torch.randn(2, 3, 64, 32)
    g1, _ = m(x)
    g2, _ = m(x)
    assert torch.equal(g1, g2)  # stochastic depth is off in eval mode
