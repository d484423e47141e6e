"""ReIDModel, ghost BatchNorm, ResNetStripes and the fine-tuned model checkpoint (PPLR
``pplr/models/resnet_part.py``, ``examples/train_pplr.py``)."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from partreid.common.errors import InputError
from partreid.common.models import reid
from partreid.common.models.reid import (GroupedBatchNorm1d, GroupedBatchNorm2d, ReIDModel, cluster_centroids,
                                convert_to_grouped_bn, load_reid_checkpoint, save_reid_checkpoint)
from partreid.common.models.resnet import ResNetStripes


class TinyBackbone(nn.Module):
    """Backbone interface stand-in: g and P=3 parts of width 4 from a linear map of an (3, 8, 4) image."""

    arch = "tiny"

    def __init__(self, embed_dim=4, num_parts=3, with_bn=False):
        super().__init__()
        self.embed_dim, self.num_parts = embed_dim, num_parts
        self.pixel_mean, self.pixel_std, self.image_size = (0.5,) * 3, (0.5,) * 3, (8, 4)
        self.proj = nn.Linear(3 * 8 * 4, embed_dim * (1 + num_parts))
        self.bn = nn.BatchNorm1d(embed_dim * (1 + num_parts)) if with_bn else nn.Identity()

    def forward(self, x):
        z = self.bn(self.proj(x.flatten(1))).view(x.shape[0], 1 + self.num_parts, self.embed_dim)
        return z[:, 0], z[:, 1:]


# ------------------------------------------------------------------------------------ centroids/classifier
def test_cluster_centroids_hand_value():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0], [0.0, 2.0]])
    cent = cluster_centroids(feats, torch.tensor([0, 0, 1, -1]))
    r = 1 / math.sqrt(2)
    assert torch.allclose(cent, torch.tensor([[r, r], [0.6, 0.8]]), atol=1e-6)
    with pytest.raises(InputError):
        cluster_centroids(feats, torch.tensor([0, 2, 2, -1]))  # id 1 empty


def test_reset_classifiers_writes_normalised_centroids_and_slices_logits():
    torch.manual_seed(0)
    model = ReIDModel(TinyBackbone(), fusion="cat", num_classes=6)
    stale = model.classifier_global.weight[3:].detach().clone()
    gc = torch.tensor([[3.0, 4.0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 2.0], [1.0, 1, 1, 1, 1, 1, 1, 1]])
    pc = torch.randn(3, 3, 4)
    model.reset_classifiers(gc, pc)
    w = model.classifier_global.weight
    assert torch.allclose(w[0], torch.tensor([0.6, 0.8, 0, 0, 0, 0, 0, 0]))
    assert torch.allclose(w[1], torch.tensor([0.0] * 7 + [1.0]))
    assert torch.allclose(w[2], torch.full((8,), 1 / math.sqrt(8)))
    assert torch.equal(w[3:], stale)  # rows beyond C keep stale values, as in the reference
    for k in range(3):
        assert torch.allclose(model.classifier_parts[k].weight[:3], F.normalize(pc[k], dim=1))
    assert model.num_classes == 3 and model.classifier_capacity == 6
    model.train()
    out = model(torch.randn(4, 3, 8, 4))
    assert out["logits_global"].shape == (4, 3) and out["logits_parts"].shape == (4, 3, 3)
    assert torch.allclose(out["logits_global"], out["global_bn"] @ w[:3].t(), atol=1e-5)
    assert torch.allclose(out["logits_parts"][:, 1], out["parts_bn"][:, 1] @ model.classifier_parts[1].weight[:3].t(),
                          atol=1e-5)


def test_reset_classifiers_grows_and_keeps_adam_state():
    torch.manual_seed(0)
    model = ReIDModel(TinyBackbone(), fusion="mean", num_classes=2)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=5e-4)
    model.reset_classifiers(torch.randn(2, 4), torch.randn(3, 2, 4))
    out = model(torch.randn(8, 3, 8, 4))
    loss = out["logits_global"].logsumexp(1).mean() + out["logits_parts"].logsumexp(2).mean()
    loss.backward()  # `loss` stays alive, as the last loss of an epoch does in a training loop
    opt.step()
    w = model.classifier_global.weight
    old_m = opt.state[w]["exp_avg"].clone()
    old_rows = w.detach()[:2].clone()
    model.reset_classifiers(torch.randn(5, 4), torch.randn(3, 5, 4), optimizer=opt)
    w2 = model.classifier_global.weight
    assert w2.shape == (5, 4) and model.num_classes == 5 and model.classifier_capacity == 5
    params = [p for g in opt.param_groups for p in g["params"]]
    assert any(p is w2 for p in params) and not any(p is w for p in params)
    m = opt.state[w2]["exp_avg"]
    assert m.shape == (5, 4) and torch.equal(m[:2], old_m) and torch.all(m[2:] == 0)
    assert not torch.equal(w2.detach()[:2], old_rows)  # rows [:C] hold the new centroids
    before = model.classifier_parts[1].weight.detach().clone()
    opt.zero_grad()
    out = model(torch.randn(8, 3, 8, 4))
    (out["logits_global"].logsumexp(1).mean() + out["logits_parts"].logsumexp(2).mean()).backward()
    opt.step()  # shapes agree after growth, and the grown part classifier is trained
    assert not torch.equal(model.classifier_parts[1].weight.detach(), before)


def test_load_state_dict_resizes_in_place():
    torch.manual_seed(0)
    src = ReIDModel(TinyBackbone(), fusion="cat", num_classes=0)
    src.reset_classifiers(torch.randn(7, 8), torch.randn(3, 7, 4))
    dst = ReIDModel(TinyBackbone(), fusion="cat", num_classes=3)
    w = dst.classifier_global.weight
    dst.load_state_dict(src.state_dict())
    assert dst.classifier_global.weight is w and w.shape == (7, 8)  # optimizers built before the load stay valid
    assert dst.num_classes == 7 and torch.equal(w, src.classifier_global.weight)


def test_fusion_dims_and_values_and_bnneck():
    x = torch.randn(5, 3, 8, 4)
    for fusion, dg in (("cat", 8), ("mean", 4), ("cls", 4)):
        model = ReIDModel(TinyBackbone(), fusion=fusion).eval()
        g, parts = model.backbone(x)
        fused, raw = model.extract(x, neck="before")
        expected = {"cat": torch.cat([g, parts.mean(1)], 1), "mean": (g + parts.mean(1)) / 2, "cls": g}[fusion]
        assert fused.shape == (5, dg) and torch.allclose(fused, expected)
        assert torch.equal(raw, parts)
        gb, pb = model.extract(x)
        assert gb.shape == (5, dg) and pb.shape == (5, 3, 4)
        assert model.neck_global.bias.requires_grad is False and torch.all(model.neck_global.bias == 0)
        assert torch.all(model.neck_global.weight == 1)
        assert all(not n.bias.requires_grad for n in model.neck_parts)
        assert model.classifier_global.bias is None
    with pytest.raises(InputError):
        ReIDModel(TinyBackbone(), fusion="max")


# ------------------------------------------------------------------------------------------------- ghost BN
def test_grouped_bn1d_equals_four_separate_passes_of_16():
    torch.manual_seed(0)
    x = torch.randn(64, 6) * 3 + 1
    gbn = GroupedBatchNorm1d(6, groups=4).train()
    with torch.no_grad():
        gbn.weight.uniform_(0.5, 2)
        gbn.bias.uniform_(-1, 1)
    ref = nn.BatchNorm1d(6)
    ref.load_state_dict(gbn.state_dict())  # state-dict compatible
    out = gbn(x)
    chunks = x.chunk(4)
    for i, c in enumerate(chunks):
        mean, var = c.mean(0), c.var(0, unbiased=False)
        expected = (c - mean) / torch.sqrt(var + 1e-5) * gbn.weight + gbn.bias
        assert torch.allclose(out[16 * i:16 * (i + 1)], expected, atol=1e-5)
    # running stats follow DataParallel's device-0 replica: the first group only
    ref.train()(chunks[0])
    assert torch.allclose(gbn.running_mean, ref.running_mean) and torch.allclose(gbn.running_var, ref.running_var)
    assert torch.allclose(gbn.running_mean, 0.1 * chunks[0].mean(0))
    assert int(gbn.num_batches_tracked) == 1
    # eval mode = plain BN with running stats
    assert torch.allclose(gbn.eval()(x), ref.eval()(x), atol=1e-6)
    assert set(gbn.state_dict()) == set(nn.BatchNorm1d(6).state_dict())


def test_grouped_bn2d_and_conversion_share_parameters():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(3)))
    bn = net[1]
    convert_to_grouped_bn(net, 2)
    assert isinstance(net[1], GroupedBatchNorm2d) and isinstance(net[2][0], GroupedBatchNorm1d)
    assert net[1].weight is bn.weight and net[1].running_mean is bn.running_mean
    x = torch.randn(6, 4, 5, 5)
    out = net[1](x)
    expected = torch.cat([F.batch_norm(c, None, None, bn.weight, bn.bias, True) for c in x.chunk(2)])
    assert torch.allclose(out, expected, atol=1e-5)


def test_reid_model_bn_groups_4_matches_4_separate_batches_of_16():
    """One batch of 64 with --bn-groups 4 == 4 forward passes of 16 (4-GPU DataParallel), necks and backbone BN."""
    torch.manual_seed(0)
    model = ReIDModel(TinyBackbone(with_bn=True), fusion="cat", num_classes=5, bn_groups=4).train()
    model.reset_classifiers(torch.randn(5, 8), torch.randn(3, 5, 4))
    plain = copy.deepcopy(model)
    plain.set_bn_groups(1)
    x = torch.randn(64, 3, 8, 4)
    out = model(x)
    outs = []
    for i, c in enumerate(x.chunk(4)):
        replica = plain if i == 0 else copy.deepcopy(plain)  # only device 0's buffer updates survive in DP
        outs.append(replica(c))
    for key in ("global_feat", "global_bn", "parts_bn", "logits_global", "logits_parts"):
        assert torch.allclose(out[key], torch.cat([o[key] for o in outs]), atol=1e-5), key
    sd, sd_ref = model.state_dict(), plain.state_dict()
    assert set(sd) == set(sd_ref)
    for k in sd:
        assert torch.allclose(sd[k].float(), sd_ref[k].float(), atol=1e-6), k
    # and differs from plain BN over the whole batch
    whole = copy.deepcopy(model)
    whole.set_bn_groups(1)
    assert not torch.allclose(whole(x)["global_bn"], out["global_bn"], atol=1e-3)


# ----------------------------------------------------------------------------------------------- ResNet
def test_resnet_last_stride_1_map_and_stripes():
    bb = ResNetStripes()
    assert (bb.embed_dim, bb.num_parts, bb.image_size) == (2048, 3, (384, 128))
    assert bb.layer4[0].conv2.stride == (1, 1) and bb.layer4[0].downsample[0].stride == (1, 1)
    with torch.device("meta"):  # shape-only forward at full size, no compute
        meta_bb = ResNetStripes()
    assert meta_bb.feature_map(torch.empty(1, 3, 384, 128, device="meta")).shape == (1, 2048, 24, 8)
    bb.eval()
    x = torch.randn(1, 3, 96, 32)  # map 6 x 2: three stripes of 2 rows each
    with torch.no_grad():
        fmap = bb.feature_map(x)
        g, parts = bb(x)
    assert fmap.shape == (1, 2048, 6, 2) and g.shape == (1, 2048) and parts.shape == (1, 3, 2048)
    assert torch.allclose(g, fmap.mean((2, 3)), atol=1e-5)
    for k in range(3):
        assert torch.allclose(parts[:, k], fmap[:, :, 2 * k:2 * k + 2].mean((2, 3)), atol=1e-5)
    assert torch.allclose(parts.mean(1), g, atol=1e-5)  # equal stripes average to the GAP


def test_resnet_weights_local_only(tmp_path):
    for bad in (True, "IMAGENET1K_V1", "DEFAULT", "https://download.pytorch.org/models/resnet50-0676ba61.pth",
                torchvision.models.ResNet50_Weights.IMAGENET1K_V1, str(tmp_path / "missing.pth")):
        with pytest.raises(InputError):
            ResNetStripes(weights=bad)
    torch.manual_seed(1)
    src = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(src.state_dict(), path)
    bb = ResNetStripes(weights=path)
    assert torch.equal(bb.conv1.weight, src.conv1.weight)
    assert torch.equal(bb.layer4[2].bn3.running_var, src.layer4[2].bn3.running_var)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(InputError):
        ResNetStripes(weights=tmp_path / "bad.pth")


# ----------------------------------------------------------------------------------------------- checkpoint
def test_checkpoint_round_trip_resnet(tmp_path):
    torch.manual_seed(0)
    model = ReIDModel(ResNetStripes(), fusion="cls", num_classes=4, bn_groups=4)
    model.reset_classifiers(torch.randn(3, 2048), torch.randn(3, 3, 2048))
    path = save_reid_checkpoint(tmp_path / "m.pth", model, {"epoch": 7, "dataset": "market1501"})
    loaded, meta = load_reid_checkpoint(path)
    assert meta["epoch"] == 7 and meta["arch"] == "resnet50" and meta["fusion"] == "cls"
    assert loaded.num_classes == 3 and loaded.classifier_capacity == 4 and loaded.bn_groups == 4
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        a, b = model.eval().extract(x), loaded.extract(x)
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_checkpoint_vit_dispatch_and_format_errors(tmp_path, monkeypatch):
    calls = []

    def build_part_vit(arch, **kw):
        calls.append((arch, kw))
        return TinyBackbone(**kw)

    monkeypatch.setattr(reid, "build_part_vit", build_part_vit)
    model = ReIDModel(TinyBackbone(embed_dim=4), fusion="mean", num_classes=0)
    model.reset_classifiers(torch.randn(9, 4), torch.randn(3, 9, 4))
    path = save_reid_checkpoint(tmp_path / "v.pth", model,
                                {"arch": "vit_tiny", "backbone_kwargs": {"embed_dim": 4}})
    loaded, meta = load_reid_checkpoint(path)
    assert calls == [("vit_tiny", {"embed_dim": 4})]
    assert loaded.num_classes == 9 and torch.equal(loaded.classifier_parts[2].weight, model.classifier_parts[2].weight)
    torch.save({"format": "partreid.features"}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="partreid.reid_model"):
        load_reid_checkpoint(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError):
        load_reid_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(InputError):
        save_reid_checkpoint(tmp_path / "x.pth", model, {"arch": "vit_tiny", "bad": object()})


def test_checkpoint_round_trip_part_vit(tmp_path):
    from partreid.common.models.vit import PartViT

    torch.manual_seed(0)
    model = ReIDModel(PartViT("vit_tiny", depth=1, image_size=(32, 16)), fusion="cat", num_classes=3)
    model.reset_classifiers(torch.randn(2, 384), torch.randn(3, 2, 192))
    loaded, meta = load_reid_checkpoint(save_reid_checkpoint(tmp_path / "vit.pth", model))
    assert meta["arch"] == "vit_tiny" and meta["image_size"] == [32, 16] and loaded.global_dim == 384
    x = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        a, b = model.eval().extract(x), loaded.extract(x)
    assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[1], b[1], atol=1e-6)
