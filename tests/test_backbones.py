"""Backbones chosen by config: detectron2 ResNet, timm Swin wrapper, pretrained loading, presets."""
import logging
import math
import os
import pickle
import re

import pytest
import torch

import unip_v2  # first: makes detectron2 importable without its compiled ops
import unip_v2.modeling.backbone  # registers build_swin_backbone

from detectron2.config import get_cfg
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone
from timm.models.swin_transformer import SwinTransformer

from unip_v2 import add_unip_v2_config
from unip_v2.modeling.backbone import SwinBackbone, load_backbone_pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["res2", "res3", "res4", "res5"]
STRIDES = [4, 8, 16, 32]
# The tiny Swin of these tests: window 4, so 32 * 4 = 128 is the aligned size.
TINY = dict(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4)


def _cfg():
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    return cfg


def _resnet_cfg(depth, norm="FrozenBN", stride_in_1x1=True):
    cfg = _cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.OUT_FEATURES = NAMES
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = stride_in_1x1
    if depth < 50:
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    return cfg


def _swin_cfg(**overrides):
    cfg = _cfg()
    cfg.MODEL.BACKBONE.NAME = "build_swin_backbone"
    cfg.MODEL.SWIN.EMBED_DIM = TINY["embed_dim"]
    cfg.MODEL.SWIN.DEPTHS = list(TINY["depths"])
    cfg.MODEL.SWIN.NUM_HEADS = list(TINY["num_heads"])
    cfg.MODEL.SWIN.WINDOW_SIZE = TINY["window_size"]
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.0  # deterministic training-mode forward
    for key, value in overrides.items():
        setattr(cfg.MODEL.SWIN, key, value)
    return cfg


def _timm_swin(window_size=TINY["window_size"], num_classes=0, embed_dim=TINY["embed_dim"]):
    """timm's own model with the wrapper's geometry settings, for reference outputs."""
    kw = dict(TINY, window_size=window_size, embed_dim=embed_dim)
    return SwinTransformer(img_size=128, num_classes=num_classes, global_pool="avg",
                           always_partition=True, strict_img_size=False, drop_path_rate=0.0,
                           **kw).eval()


def _randomize(module, seed):
    """Fill every parameter and float buffer with random values (running_var positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name
                        else torch.randn(t.shape, generator=g) * 0.1)
    return module


def _check_outputs(outputs, shapes, batch, h, w):
    assert list(outputs) == list(shapes)
    for name, spec in shapes.items():
        expected = (batch, spec.channels, math.ceil(h / spec.stride), math.ceil(w / spec.stride))
        assert tuple(outputs[name].shape) == expected, name


# ------------------------------------------------------------------ ResNet (detectron2)

@pytest.mark.parametrize("depth, channels", [(18, [64, 128, 256, 512]), (34, [64, 128, 256, 512]),
                                             (50, [256, 512, 1024, 2048])])
def test_resnet_outputs(depth, channels):
    backbone = build_backbone(_resnet_cfg(depth)).eval()
    shapes = backbone.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == dict(
        zip(NAMES, zip(channels, STRIDES)))
    with torch.no_grad():
        _check_outputs(backbone(torch.randn(2, 3, 37, 45)), shapes, 2, 37, 45)


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_loads_torchvision_state_dict(tmp_path, depth):
    import torchvision

    tv = _randomize(getattr(torchvision.models, f"resnet{depth}")(weights=None), seed=1).eval()
    path = str(tmp_path / "tv.pth")
    torch.save(tv.state_dict(), path)
    # torchvision strides the 3x3 conv of a bottleneck: STRIDE_IN_1X1 False.
    backbone = build_backbone(_resnet_cfg(depth, stride_in_1x1=False)).eval()
    report = load_backbone_pretrained(backbone, path)

    assert report["missing"] == report["unexpected"] == report["shape_mismatch"] == []
    assert "fc.weight" in report["ignored"] and "bn1.num_batches_tracked" in report["ignored"]
    assert "res2.0.shortcut.norm.running_var" in report["loaded"] or depth == 18
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        tv_features = tv.layer4(tv.layer3(tv.layer2(tv.layer1(
            tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        torch.testing.assert_close(backbone(x)["res5"], tv_features, rtol=1e-4, atol=1e-4)


def test_resnet_round_trip_d2_pkl_into_batchnorm(tmp_path):
    source = _randomize(build_backbone(_resnet_cfg(18, norm="BN")), seed=2).eval()
    weights = {k: v.numpy() for k, v in source.state_dict().items()}
    path = str(tmp_path / "r18.pkl")
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "test"}, f)
    target = build_backbone(_resnet_cfg(18, norm="BN")).eval()
    report = load_backbone_pretrained(target, path)

    assert report["missing"] == report["unexpected"] == []
    assert "stem.conv1.norm.running_mean" in report["loaded"]
    assert not any(k.endswith("num_batches_tracked") for k in report["loaded"] + report["missing"])
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        for name, out in source(x).items():
            torch.testing.assert_close(target(x)[name], out)


def test_resnet_caffe2_names_and_stride_warning(tmp_path, caplog):
    backbone = build_backbone(_resnet_cfg(50))  # STRIDE_IN_1X1 True (MSRA style)
    conv1 = torch.randn_like(backbone.stem.conv1.weight)
    scale = torch.rand_like(backbone.stem.conv1.norm.weight)
    path = str(tmp_path / "c2.pkl")
    with open(path, "wb") as f:
        pickle.dump({"conv1_w": conv1.numpy(), "res_conv1_bn_s": scale.numpy(),
                     "res2_0_branch2a_w_momentum": conv1.numpy(),
                     "fc1000_w": torch.zeros(1000, 2048).numpy()}, f)
    report = load_backbone_pretrained(backbone, path)
    assert report["loaded"] == ["stem.conv1.weight", "stem.conv1.norm.weight"]
    assert report["ignored"] == ["fc1000_w"] and report["unexpected"] == []
    assert torch.equal(backbone.stem.conv1.weight, conv1)
    # FrozenBN buffers the file lacks keep their values (no reset by load_state_dict hooks).
    assert torch.equal(backbone.stem.conv1.norm.running_var,
                       torch.ones_like(scale) - backbone.stem.conv1.norm.eps)

    torch.save({"conv1.weight": conv1}, str(tmp_path / "tv.pth"))
    with caplog.at_level(logging.WARNING):
        load_backbone_pretrained(backbone, str(tmp_path / "tv.pth"))
    assert "STRIDE_IN_1X1" in caplog.text


# ------------------------------------------------------------------ Swin

def test_swin_registered_and_shapes_at_odd_size():
    assert BACKBONE_REGISTRY.get("build_swin_backbone") is not None
    backbone = build_backbone(_swin_cfg()).eval()
    assert isinstance(backbone, SwinBackbone)
    shapes = backbone.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == dict(
        zip(NAMES, zip([24, 48, 96, 192], STRIDES)))
    assert backbone.size_divisibility == 32
    assert backbone.padding_constraints["size_divisibility"] == 32
    with torch.no_grad():
        for h, w in [(97, 131), (5, 3)]:  # 5x3: smaller than one window at every stage
            outputs = backbone(torch.randn(2, 3, h, w))
            _check_outputs(outputs, shapes, 2, h, w)
            assert all(o.is_contiguous() for o in outputs.values())


def test_swin_out_features_subset_and_config_values():
    backbone = build_backbone(_swin_cfg(OUT_FEATURES=["res3"], DROP_PATH_RATE=0.3, MLP_RATIO=2.0))
    assert list(backbone.output_shape()) == ["res3"]
    assert len(backbone.layers) == 2 and not hasattr(backbone, "norm0")
    block = backbone.layers[1].blocks[1]
    assert block.mlp.fc1.out_features == 2 * 48
    assert 0 < block.drop_path2.drop_prob < 0.3  # linear in depth, 0.3 only at the last block
    assert set(backbone(torch.randn(1, 3, 33, 20))) == {"res3"}


def test_swin_gradients_reach_every_parameter():
    backbone = build_backbone(_swin_cfg()).train()
    outputs = backbone(torch.randn(2, 3, 97, 131))
    sum(o.square().mean() for o in outputs.values()).backward()
    no_grad = [n for n, p in backbone.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert no_grad == []


def test_swin_equals_timm_at_aligned_size():
    backbone = build_backbone(_swin_cfg()).eval()
    reference = _timm_swin()
    incompatible = reference.load_state_dict(backbone.state_dict(), strict=False)
    assert sorted(incompatible.missing_keys) == ["norm.bias", "norm.weight"]
    x = torch.randn(2, 3, 128, 256)
    with torch.no_grad():
        ours = backbone(x)
        theirs = reference.forward_intermediates(x, intermediates_only=True)
        for i, name in enumerate(NAMES):
            norm = getattr(backbone, f"norm{i}")
            torch.testing.assert_close(ours[name], norm(theirs[i].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_swin_shifted_windows_do_not_wrap_across_the_image():
    # 52 px -> a 13x13 stage-1 map, padded to 16 for window 4. After one plain and one
    # shifted block, feature row 0 sees feature rows 0..3 (image rows 0..15) only; rolling
    # before padding (timm's order) would mix in the bottom rows.
    backbone = build_backbone(_swin_cfg()).eval()
    x = torch.randn(1, 3, 52, 52, requires_grad=True)
    backbone(x)["res2"][:, :, 0, :].sum().backward()
    rows = (x.grad.abs().sum(dim=(0, 1, 3)) > 0).nonzero().flatten().tolist()
    assert rows == list(range(16))


def test_swin_rejects_bad_input_and_config():
    backbone = build_backbone(_swin_cfg())
    with pytest.raises(ValueError, match=r"\(3, 64, 64\)"):
        backbone(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"\(1, 4, 64, 64\)"):
        backbone(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="heads do not divide"):
        build_backbone(_swin_cfg(NUM_HEADS=[5, 2, 4, 8]))
    with pytest.raises(ValueError, match="OUT_FEATURES"):
        build_backbone(_swin_cfg(OUT_FEATURES=["res6"]))


# ------------------------------------------------------------------ Swin pretrained

def _official_layout(timm_state):
    """timm names -> the official Swin release: PatchMerging at the end of the previous
    stage, head.fc -> head, plus the buffers the official code saved."""
    state = {}
    for key, value in timm_state.items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.",
                     lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
        state[key.replace("head.fc.", "head.")] = value
    state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 16, 16)
    return {"model": state}


def test_swin_loads_timm_and_official_checkpoints(tmp_path):
    source = _randomize(_timm_swin(num_classes=10), seed=3)
    timm_path, official_path = str(tmp_path / "timm.pth"), str(tmp_path / "official.pth")
    torch.save(source.state_dict(), timm_path)
    torch.save(_official_layout(source.state_dict()), official_path)
    assert any(k.startswith("layers.0.downsample") for k in _official_layout(source.state_dict())["model"])

    from_timm = build_backbone(_swin_cfg()).eval()
    report = load_backbone_pretrained(from_timm, timm_path)
    norms = sorted(f"norm{i}.{p}" for i in range(4) for p in ("bias", "weight"))
    assert sorted(report["missing"]) == norms
    assert report["unexpected"] == report["shape_mismatch"] == report["interpolated"] == []
    assert {"head.fc.weight", "norm.weight"} <= set(report["ignored"])
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        theirs = source.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(from_timm(x)["res3"], from_timm.norm1(
            theirs[1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))

    from safetensors.torch import save_file

    safetensors_path = str(tmp_path / "timm.safetensors")
    save_file(source.state_dict(), safetensors_path)
    assert load_backbone_pretrained(build_backbone(_swin_cfg()), safetensors_path)["loaded"] == report["loaded"]

    from_official = build_backbone(_swin_cfg()).eval()
    report = load_backbone_pretrained(from_official, official_path)
    assert sorted(report["missing"]) == norms and report["unexpected"] == []
    assert {"head.weight", "layers.0.blocks.1.attn_mask"} <= set(report["ignored"])
    assert "layers.1.downsample.reduction.weight" in report["loaded"]
    state = from_official.state_dict()
    for key, value in from_timm.state_dict().items():
        if not key.startswith("norm"):
            assert torch.equal(state[key], value), key


def test_swin_report_lists_unexpected_and_mismatched(tmp_path):
    backbone = build_backbone(_swin_cfg())
    state = _randomize(_timm_swin(), seed=4).state_dict()
    state["patch_embed.proj.weight"] = torch.zeros(24, 3, 2, 2)  # patch size 2: other shape
    state["extra.weight"] = torch.zeros(3)
    path = str(tmp_path / "odd.pth")
    torch.save(state, path)
    before = backbone.patch_embed.proj.weight.clone()
    report = load_backbone_pretrained(backbone, path)
    assert report["unexpected"] == ["extra.weight"]
    assert report["shape_mismatch"] == [
        "patch_embed.proj.weight -> patch_embed.proj.weight: file (24, 3, 2, 2) vs model (24, 3, 4, 4)"]
    assert "patch_embed.proj.weight" not in report["loaded"] + report["missing"]
    assert torch.equal(backbone.patch_embed.proj.weight, before)
    assert "layers.0.blocks.0.attn.qkv.weight" in report["loaded"]


def test_swin_window_size_interpolation(tmp_path):
    source = _timm_swin(window_size=4)
    with torch.no_grad():
        for module in source.modules():
            if hasattr(module, "relative_position_bias_table"):
                heads = module.relative_position_bias_table.shape[1]
                module.relative_position_bias_table.copy_(torch.arange(heads).float().expand(49, heads))
    path = str(tmp_path / "w4.pth")
    torch.save(source.state_dict(), path)
    backbone = build_backbone(_swin_cfg(WINDOW_SIZE=7))
    report = load_backbone_pretrained(backbone, path)
    assert len(report["interpolated"]) == 8 and report["shape_mismatch"] == []
    assert "window 4 -> 7 (bicubic)" in report["interpolated"][0]
    table = backbone.layers[3].blocks[1].attn.relative_position_bias_table
    assert tuple(table.shape) == (13 * 13, 8)
    # A per-head constant stays that constant after resampling.
    torch.testing.assert_close(table.detach(), torch.arange(8).float().expand(169, 8))


def test_load_errors(tmp_path):
    backbone = build_backbone(_swin_cfg())
    missing = str(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_backbone_pretrained(backbone, missing)

    resnet_file = str(tmp_path / "r18.pth")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, resnet_file)
    with pytest.raises(ValueError, match="only 0 of the 2 tensors"):
        load_backbone_pretrained(backbone, resnet_file)

    wide = str(tmp_path / "wide.pth")  # right names, every shape wrong (another Swin size)
    torch.save(_timm_swin(embed_dim=32).state_dict(), wide)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(ValueError, match="other shapes"):
        load_backbone_pretrained(backbone, wide)
    # The bias tables (heads x window only) fitted, but nothing is written on failure.
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())

    other = str(tmp_path / "weights.npz")
    open(other, "wb").close()
    with pytest.raises(ValueError, match=r"\.pth"):
        load_backbone_pretrained(backbone, other)
    with pytest.raises(TypeError, match="Linear"):
        load_backbone_pretrained(torch.nn.Linear(2, 2), resnet_file)


# ------------------------------------------------------------------ preset configs

PRESETS = {
    "tiny": (96, [2, 2, 6, 2], [3, 6, 12, 24], 7),
    "small": (96, [2, 2, 18, 2], [3, 6, 12, 24], 7),
    "base": (128, [2, 2, 18, 2], [4, 8, 16, 32], 12),
    "large": (192, [2, 2, 18, 2], [6, 12, 24, 48], 12),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_swin_preset_configs_merge(preset, tmp_path):
    path = os.path.join(REPO, "configs", "swin", f"swin_{preset}.yaml")
    with open(path) as f:
        assert f.readline().startswith("#")
    cfg = _cfg()
    cfg.merge_from_file(path)
    s = cfg.MODEL.SWIN
    assert cfg.MODEL.BACKBONE.NAME == "build_swin_backbone"
    assert (s.EMBED_DIM, list(s.DEPTHS), list(s.NUM_HEADS), s.WINDOW_SIZE) == PRESETS[preset]
    assert all((s.EMBED_DIM * 2 ** i) % h == 0 for i, h in enumerate(s.NUM_HEADS))

    # A leaf config inherits the base config and a preset through a list-valued _BASE_.
    leaf = tmp_path / "leaf.yaml"
    leaf.write_text(f"_BASE_: [{os.path.join(REPO, 'configs', 'Base-UniPerceiverV2.yaml')}, {path}]\n"
                    "MODEL:\n  SWIN:\n    DROP_PATH_RATE: 0.5\n")
    cfg = _cfg()
    cfg.merge_from_file(str(leaf))
    assert cfg.MODEL.SWIN.EMBED_DIM == PRESETS[preset][0] and cfg.MODEL.SWIN.DROP_PATH_RATE == 0.5
