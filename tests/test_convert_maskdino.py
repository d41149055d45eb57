"""unip_v2.checkpoint.maskdino and its command line tools/convert_maskdino.py: a Mask DINO
checkpoint onto unip-v2's image encoder.

The sources are fake Mask DINO state dicts with the real key names and shapes of
IDEA-Research/MaskDINO's released checkpoints and random
values: the R50 reference model in full, and a Swin-L "4s" one with 1 block per stage.
"""
import json
import logging
import os
import pickle

import pytest
import torch

import unip_v2  # noqa: F401  first: makes detectron2 importable

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from unip_v2.checkpoint import maskdino as cm
from unip_v2.layers import MSDeformAttn

from tools_loader import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R50_CONFIG = os.path.join(REPO, "configs", "proposal_network", "R50_coco.yaml")
PIX, PRED = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
IE = "image_encoder."


cli = load_tool("convert_maskdino")  # the command line; the library is `cm`


# ------------------------------------------------------------------ fake Mask DINO

def _r50_backbone_state():
    """detectron2 R50 as Mask DINO builds it (FrozenBN, stride in the 3x3 conv)."""
    cfg = get_cfg()
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    return build_resnet_backbone(cfg, ShapeSpec(channels=3)).state_dict()


def maskdino_state(backbone_state, channels, res2_channels, num_extra=1, order="low2high",
                   enc_layers=6, dec_layers=9, classes=80, seed=0):
    """A Mask DINO state dict: `channels` are the in-channels of the encoder's backbone
    levels, fine to coarse; d=256, FFN 2048, 8 heads, 4 points (the COCO configs)."""
    d, ffn, heads, points = 256, 2048, 8, 4
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {"backbone." + k: (r(*v.shape) if v.is_floating_point() else v)
          for k, v in backbone_state.items()}

    def linear(p, o, i):
        sd[p + ".weight"], sd[p + ".bias"] = r(o, i), r(o)

    def norm(p):
        sd[p + ".weight"], sd[p + ".bias"] = r(d), r(d)

    def conv_gn(p, cin, k):
        sd[p + "0.weight"], sd[p + "0.bias"] = r(d, cin, k, k), r(d)
        norm(p + "1")

    def msda(p, levels):
        linear(p + "sampling_offsets", heads * levels * points * 2, d)
        linear(p + "attention_weights", heads * levels * points, d)
        linear(p + "value_proj", d, d)
        linear(p + "output_proj", d, d)

    levels = len(channels) + num_extra
    # Mask DINO builds the 1x1 projections res3.. for low2high, ..res3 for high2low.
    for j, c in enumerate(channels if order == "low2high" else channels[::-1]):
        conv_gn(f"{PIX}input_proj.{j}.", c, 1)
    cin = max(channels)
    for k in range(num_extra):
        conv_gn(f"{PIX}input_proj.{len(channels) + k}.", cin, 3)
        cin = d
    sd[PIX + "transformer.level_embed"] = r(levels, d)
    for i in range(enc_layers):
        p = f"{PIX}transformer.encoder.layers.{i}."
        msda(p + "self_attn.", levels)
        norm(p + "norm1")
        linear(p + "linear1", ffn, d)
        linear(p + "linear2", d, ffn)
        norm(p + "norm2")
    sd[PIX + "mask_features.weight"], sd[PIX + "mask_features.bias"] = r(d, d, 1, 1), r(d)
    sd[PIX + "adapter_1.weight"] = r(d, res2_channels, 1, 1)
    norm(PIX + "adapter_1.norm")
    sd[PIX + "layer_1.weight"] = r(d, d, 3, 3)
    norm(PIX + "layer_1.norm")

    linear(PRED + "enc_output", d, d)
    norm(PRED + "enc_output_norm")
    linear(PRED + "class_embed", classes, d)
    sd[PRED + "label_enc.weight"] = r(classes, d)
    for k in range(3):
        linear(f"{PRED}mask_embed.layers.{k}", d, d)
    norm(PRED + "decoder_norm")
    for s in ("weight", "bias"):  # one LayerNorm object under two names
        sd[f"{PRED}decoder.norm.{s}"] = sd[f"{PRED}decoder_norm.{s}"]
    for i in range(dec_layers):
        p = f"{PRED}decoder.layers.{i}."
        msda(p + "cross_attn.", levels)
        norm(p + "norm1")
        sd[p + "self_attn.in_proj_weight"], sd[p + "self_attn.in_proj_bias"] = r(3 * d, d), r(3 * d)
        linear(p + "self_attn.out_proj", d, d)
        norm(p + "norm2")
        linear(p + "linear1", ffn, d)
        linear(p + "linear2", d, ffn)
        norm(p + "norm3")
    linear(PRED + "decoder.ref_point_head.layers.0", d, 2 * d)
    linear(PRED + "decoder.ref_point_head.layers.1", d, d)
    for k, o in enumerate((d, d, 4)):
        linear(f"{PRED}_bbox_embed.layers.{k}", o, d)
    for i in range(dec_layers):  # one MLP under 19 names
        for k in range(3):
            for s in ("weight", "bias"):
                t = sd[f"{PRED}_bbox_embed.layers.{k}.{s}"]
                sd[f"{PRED}bbox_embed.{i}.layers.{k}.{s}"] = t
                sd[f"{PRED}decoder.bbox_embed.{i}.layers.{k}.{s}"] = t
    sd["criterion.empty_weight"] = torch.ones(classes + 1)
    return sd


@pytest.fixture(scope="module")
def r50_model():
    return cm.build_target_model(R50_CONFIG)


@pytest.fixture(scope="module")
def r50_backbone():
    return _r50_backbone_state()


@pytest.fixture(scope="module")
def r50_source(r50_backbone):
    return maskdino_state(r50_backbone, [512, 1024, 2048], 256)


def _attn(state, prefix, levels):
    """A reference-backend MSDeformAttn holding state[prefix + ...]."""
    attn = MSDeformAttn(256, levels, 8, 4, backend="reference")
    attn.load_state_dict({k: state[prefix + k] for k in attn.state_dict()})
    return attn.eval()


def _same_attention(src_state, src_prefix, src_order, dst_state, dst_prefix, dst_order,
                    box_refs, drop_rank=None):
    """Run Mask DINO's MSDeformAttn on value levels in its order and ours on the same maps
    in unip-v2's order; orders are lists of ranks (0 = finest). With drop_rank, Mask DINO's
    attention to that level is switched off (logit bias -1e4), so both must agree."""
    shapes_by_rank = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    g = torch.Generator().manual_seed(1)
    maps = {r: torch.randn(2, h * w, 256, generator=g) for r, (h, w) in enumerate(shapes_by_rank)}
    query = 0.05 * torch.randn(2, 7, 256, generator=g)
    src_attn = _attn(src_state, src_prefix, len(src_order))
    if drop_rank is not None:
        level = src_order.index(drop_rank)
        with torch.no_grad():
            src_attn.attention_weights.bias.view(8, len(src_order), 4)[:, level] = -1e4
    dst_attn = _attn(dst_state, dst_prefix, len(dst_order))
    if box_refs:
        ref = torch.rand(2, 7, 1, 4, generator=g) * 0.5 + 0.25
    else:
        ref = torch.rand(2, 7, 1, 2, generator=g)

    def run(attn, order):
        shapes = torch.tensor([shapes_by_rank[r] for r in order])
        start = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
        value = torch.cat([maps[r] for r in order], 1)
        with torch.no_grad():
            return attn(query, ref.expand(-1, -1, len(order), -1), value, shapes, start)

    ours, theirs = run(dst_attn, dst_order), run(src_attn, src_order)
    assert ours.abs().mean() > 1e-3  # the points really sample the maps
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ tests

def test_fake_source_has_maskdino_r50_layout(r50_source):
    """The fake matches the counts of Mask DINO's released R50 instance-segmentation
    checkpoint: 720 keys, 610 distinct tensors, 52,058,004 parameters."""
    assert len(r50_source) == 720
    unique = {id(v): (k, v) for k, v in r50_source.items()}
    assert len(unique) == 610
    # parameters: everything but FrozenBN statistics/affine buffers and the loss buffer
    params = sum(v.numel() for k, v in unique.values()
                 if not (k.startswith("backbone.") and ".norm." in k) and not k.startswith("criterion"))
    assert params == 52_058_004


def test_r50_cli_output_loads_with_no_missing_keys(tmp_path, r50_model, r50_source, capsys):
    src_path, out_path = str(tmp_path / "maskdino_r50.pth"), str(tmp_path / "out" / "conv.pth")
    report_path = str(tmp_path / "report.json")
    torch.save({"model": r50_source, "iteration": 368749}, src_path)
    report = cli.main(["--config-file", R50_CONFIG, "--input", src_path, "--output", out_path,
                       "--report-json", report_path])
    printed = capsys.readouterr().out
    assert "criterion.empty_weight" in printed and "two-stage anchors differ" in printed

    # the config written next to the checkpoint: the target config, the checkpoint and Mask
    # DINO's proposal-path conventions (the published COCO configs' mask2box by default)
    config_path = str(tmp_path / "out" / "conv.yaml")
    assert report["output_config"] == config_path and config_path in printed
    written = get_cfg()
    unip_v2.add_unip_v2_config(written)
    written.merge_from_file(config_path)
    ie = written.MODEL.IMAGE_ENCODER
    assert written.MODEL.WEIGHTS == os.path.abspath(out_path)
    assert (ie.TWO_STAGE_INVALID_TOKENS, ie.INITIALIZE_BOX_TYPE, ie.MASK_BOX_CONVENTION) == (
        "zero", "mask2box", "pixel_index")
    assert ie.NUM_QUERIES == 300 and written.MODEL.BACKBONE.PRETRAINED == ""
    # a "low2high" Mask DINO sized its anchors 0.05 * 2**l in its reversed decoder order
    assert list(ie.TWO_STAGE_ANCHOR_SIZES) == [0.4, 0.2, 0.1, 0.05]   # s8, s16, s32, s64

    checkpointer = DetectionCheckpointer(r50_model)
    checkpoint = checkpointer._load_file(out_path)
    assert checkpoint["matching_heuristics"] is False and "__author__" in checkpoint
    incompatible = checkpointer._load_model(checkpoint)
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []
    state = r50_model.state_dict()

    # every source key is converted or dropped with a reason; the report lists both
    with open(report_path) as f:
        saved = json.load(f)
    assert saved["dropped"] == report["dropped"] and saved["output"] == out_path
    origins = {o.split(" ")[0] for o in report["mapped"].values()}
    assert origins | set(report["dropped"]) == set(r50_source)
    assert not origins & set(report["dropped"])
    aliases = {k for k in r50_source if ".bbox_embed." in "." + k[len(PRED):]} | {
        PRED + "decoder.norm.weight", PRED + "decoder.norm.bias"}
    assert len(aliases) == 110
    dropped_layers = {k for k in r50_source if k.startswith(tuple(
        f"{PRED}decoder.layers.{i}." for i in (6, 7, 8)))}
    assert set(report["dropped"]) == aliases | dropped_layers | {"criterion.empty_weight"}
    assert all("alias of" in report["dropped"][k] for k in aliases)
    assert "decoder layer 7 not kept" in report["dropped"][PRED + "decoder.layers.7.norm1.weight"]
    new = {k for k in state if k.startswith((IE + "region_proposals.", IE + "global_tokens."))}
    assert set(report["initialised"]) == new | {IE + "proposal_decoder.query_embed.weight"}
    assert report["warnings"] == []
    assert report["source"]["feature_order"] == "low2high"
    assert report["source"]["decoder_levels"] == ["s64", "s32", "s16", "s8"]

    # tensors land where they should
    def same(ours, theirs):
        assert torch.equal(state[IE + ours], r50_source[theirs]), ours

    same("backbone.res5.2.conv3.weight", "backbone.res5.2.conv3.weight")
    same("backbone.stem.conv1.norm.running_var", "backbone.stem.conv1.norm.running_var")
    same("pixel_encoder.input_proj.0.0.weight", PIX + "input_proj.0.0.weight")  # res3
    same("pixel_encoder.input_proj.3.0.weight", PIX + "input_proj.3.0.weight")  # s64 conv
    same("pixel_encoder.level_embed", PIX + "transformer.level_embed")  # s8.. in both
    same("pixel_encoder.encoder.layers.5.linear2.weight", PIX + "transformer.encoder.layers.5.linear2.weight")
    same("pixel_encoder.adapter_1.norm.bias", PIX + "adapter_1.norm.bias")
    same("pixel_encoder.layer_1.weight", PIX + "layer_1.weight")
    same("pixel_encoder.mask_features.bias", PIX + "mask_features.bias")
    same("proposal_decoder.enc_output_norm.weight", PRED + "enc_output_norm.weight")
    same("proposal_decoder.decoder_norm.weight", PRED + "decoder.norm.weight")
    same("proposal_decoder._bbox_embed.layers.2.weight", PRED + "decoder.bbox_embed.4.layers.2.weight")
    same("proposal_decoder.mask_embed.layers.1.bias", PRED + "mask_embed.layers.1.bias")
    same("proposal_decoder.decoder.ref_point_head.layers.0.weight", PRED + "decoder.ref_point_head.layers.0.weight")
    same("proposal_decoder.decoder.layers.5.self_attn.in_proj_weight", PRED + "decoder.layers.5.self_attn.in_proj_weight")
    same("proposal_decoder.decoder.layers.2.norm3.bias", PRED + "decoder.layers.2.norm3.bias")
    same("proposal_decoder.decoder.layers.0.cross_attn.value_proj.weight", PRED + "decoder.layers.0.cross_attn.value_proj.weight")
    # class head: 80 -> 1
    torch.testing.assert_close(state[IE + "proposal_decoder.class_embed.weight"],
                               r50_source[PRED + "class_embed.weight"].mean(0, keepdim=True))
    torch.testing.assert_close(state[IE + "proposal_decoder.class_embed.bias"],
                               r50_source[PRED + "class_embed.bias"].logsumexp(0, keepdim=True))
    torch.testing.assert_close(state[IE + "proposal_decoder.label_enc.weight"],
                               r50_source[PRED + "label_enc.weight"].mean(0, keepdim=True))
    assert not state[IE + "proposal_decoder.query_embed.weight"].any()

    # the decoder's cross-attention reads Mask DINO's levels reversed (s64 first): the
    # converted layer on levels fine to coarse computes what the original did.
    for layer in (0, 5):
        _same_attention(r50_source, f"{PRED}decoder.layers.{layer}.cross_attn.", [3, 2, 1, 0],
                        state, f"{IE}proposal_decoder.decoder.layers.{layer}.cross_attn.",
                        [0, 1, 2, 3], box_refs=True)
    _same_attention(r50_source, f"{PIX}transformer.encoder.layers.1.self_attn.", [0, 1, 2, 3],
                    state, f"{IE}pixel_encoder.encoder.layers.1.self_attn.", [0, 1, 2, 3],
                    box_refs=False)


def test_high2low_source_is_permuted_into_fine_to_coarse(r50_model, r50_backbone):
    source = maskdino_state(r50_backbone, [512, 1024, 2048], 256, order="high2low", seed=2)
    state, report = cm.convert_maskdino(source, r50_model)
    assert report["source"]["feature_order"] == "high2low"
    assert report["source"]["encoder_levels"] == ["s64", "s32", "s16", "s8"]
    assert any("two-stage anchors: the same" in n for n in report["notes"])
    # input_proj.0 of a high2low checkpoint reads res5; ours reads res3
    for t, j in enumerate((2, 1, 0, 3)):
        assert torch.equal(state[f"{IE}pixel_encoder.input_proj.{t}.0.weight"],
                           source[f"{PIX}input_proj.{j}.0.weight"])
    assert torch.equal(state[IE + "pixel_encoder.level_embed"],
                       source[PIX + "transformer.level_embed"].flip(0))
    _same_attention(source, f"{PIX}transformer.encoder.layers.3.self_attn.", [3, 2, 1, 0],
                    state, f"{IE}pixel_encoder.encoder.layers.3.self_attn.", [0, 1, 2, 3],
                    box_refs=False)
    _same_attention(source, f"{PRED}decoder.layers.4.cross_attn.", [0, 1, 2, 3],
                    state, f"{IE}proposal_decoder.decoder.layers.4.cross_attn.", [0, 1, 2, 3],
                    box_refs=True)


def test_decoder_layer_choice_fresh_class_head_and_alias_mismatch(r50_model, r50_source, caplog):
    source = dict(r50_source)
    changed = PRED + "bbox_embed.3.layers.0.weight"
    source[changed] = source[changed] + 1
    with caplog.at_level(logging.WARNING, logger="unip_v2.checkpoint.maskdino"):
        state, report = cm.convert_maskdino(source, r50_model, decoder_layers="0,2,4,6,7,8",
                                            class_head="fresh")
    assert any(changed in w for w in report["warnings"]) and changed in caplog.text
    assert "differs" in report["dropped"][changed]
    assert torch.equal(state[IE + "proposal_decoder._bbox_embed.layers.0.weight"],
                       source[PRED + "_bbox_embed.layers.0.weight"])
    for t, s in enumerate((0, 2, 4, 6, 7, 8)):
        assert torch.equal(state[f"{IE}proposal_decoder.decoder.layers.{t}.linear1.weight"],
                           source[f"{PRED}decoder.layers.{s}.linear1.weight"])
    assert "not kept" in report["dropped"][PRED + "decoder.layers.5.norm1.bias"]
    _same_attention(source, f"{PRED}decoder.layers.8.cross_attn.", [3, 2, 1, 0],
                    state, f"{IE}proposal_decoder.decoder.layers.5.cross_attn.", [0, 1, 2, 3],
                    box_refs=True)
    fresh = r50_model.state_dict()
    for key in ("class_embed.weight", "class_embed.bias", "label_enc.weight"):
        assert IE + "proposal_decoder." + key in report["initialised"]
        assert "--class-head fresh" in report["dropped"][PRED + key]
        assert torch.equal(state[IE + "proposal_decoder." + key], fresh[IE + "proposal_decoder." + key])

    with pytest.raises(ValueError, match="DEC_LAYERS=6"):
        cm.convert_maskdino(r50_source, r50_model, decoder_layers="0,1")
    with pytest.raises(ValueError, match="0..8"):
        cm.convert_maskdino(r50_source, r50_model, decoder_layers=[0, 1, 2, 3, 4, 9])
    with pytest.raises(ValueError, match="class_head"):
        cm.convert_maskdino(r50_source, r50_model, class_head="max")


# ------------------------------------------------------------------ Swin-L "4s"

def _swin_cfg_file(tmp_path):
    leaf = tmp_path / "swin_l_rpn.yaml"
    leaf.write_text(
        f"_BASE_: [{R50_CONFIG}, {os.path.join(REPO, 'configs', 'swin', 'swin_large.yaml')}]\n"
        "MODEL:\n  SWIN:\n    DEPTHS: [1, 1, 1, 1]\n")
    return str(leaf)


def _official_swin_backbone(target_backbone_state):
    """Mask DINO's D2SwinTransformer names (official Swin layout: PatchMerging at the end
    of the previous stage; relative_position_index saved) from a timm-layout state."""
    import re

    state = {}
    for key, value in target_backbone_state.items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.",
                     lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
        state[key] = value
        if key.endswith("attn.relative_position_bias_table"):
            state[key.replace("bias_table", "index")] = torch.zeros(144, 144, dtype=torch.long)
    return state


def test_swin_large_4s_drops_the_stride4_level(tmp_path, r50_source):
    model = cm.build_target_model(_swin_cfg_file(tmp_path))
    backbone = {k[len(IE + "backbone."):]: v for k, v in model.state_dict().items()
                if k.startswith(IE + "backbone.")}
    source = maskdino_state(_official_swin_backbone(backbone), [192, 384, 768, 1536], 192, seed=3)
    assert source[PIX + "input_proj.4.0.weight"].shape == (256, 1536, 3, 3)
    assert source[PIX + "transformer.encoder.layers.0.self_attn.sampling_offsets.weight"].shape == (320, 256)
    assert "backbone.layers.0.downsample.reduction.weight" in source
    # in memory: the file round trip is covered by the R50 and .pkl tests
    state, report = cm.convert_maskdino(source, model)
    loaded = model.load_state_dict(state, strict=True)
    assert loaded.missing_keys == loaded.unexpected_keys == []

    assert report["source"]["levels"] == ["s4", "s8", "s16", "s32", "s64"]
    assert report["source"]["backbone_layout"] == "official"
    assert report["target"]["levels"] == ["s8", "s16", "s32", "s64"]
    assert any("s4 dropped" in n for n in report["notes"])
    for s in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert "level s4" in report["dropped"][f"{PIX}input_proj.0.{s}"]
    assert "relative_position_index" in " ".join(report["dropped"])
    for t in range(4):  # input_proj.{1..4} -> {0..3}
        assert torch.equal(state[f"{IE}pixel_encoder.input_proj.{t}.0.weight"],
                           source[f"{PIX}input_proj.{t + 1}.0.weight"])
    assert torch.equal(state[IE + "pixel_encoder.level_embed"],
                       source[PIX + "transformer.level_embed"][1:])
    assert torch.equal(state[IE + "pixel_encoder.adapter_1.weight"], source[PIX + "adapter_1.weight"])
    assert torch.equal(state[IE + "backbone.layers.1.downsample.reduction.weight"],
                       source["backbone.layers.0.downsample.reduction.weight"])
    assert torch.equal(state[IE + "backbone.norm3.weight"], source["backbone.norm3.weight"])
    # the level blocks that remain are the s8..s64 blocks, in our order
    enc = source[PIX + "transformer.encoder.layers.2.self_attn.sampling_offsets.weight"]
    assert torch.equal(state[IE + "pixel_encoder.encoder.layers.2.self_attn.sampling_offsets.weight"],
                       enc.view(8, 5, 4, 2, 256)[:, 1:].reshape(-1, 256))
    dec = source[PRED + "decoder.layers.1.cross_attn.attention_weights.bias"]
    assert torch.equal(state[IE + "proposal_decoder.decoder.layers.1.cross_attn.attention_weights.bias"],
                       dec.view(8, 5, 4)[:, [3, 2, 1, 0]].reshape(-1))
    # with Mask DINO's attention to s4 switched off, both compute the same
    _same_attention(source, f"{PIX}transformer.encoder.layers.0.self_attn.", [0, 1, 2, 3, 4],
                    state, f"{IE}pixel_encoder.encoder.layers.0.self_attn.", [1, 2, 3, 4],
                    box_refs=False, drop_rank=0)
    _same_attention(source, f"{PRED}decoder.layers.3.cross_attn.", [4, 3, 2, 1, 0],
                    state, f"{IE}proposal_decoder.decoder.layers.3.cross_attn.", [1, 2, 3, 4],
                    box_refs=True, drop_rank=0)

    # an R50 checkpoint for this Swin config: a clear error, not a half-filled model
    with pytest.raises(ValueError, match="describe the checkpoint's backbone"):
        cm.convert_maskdino(r50_source, model)


# ------------------------------------------------------------------ wrong input

def test_reads_detectron2_pkl_with_numpy_arrays(tmp_path, r50_source):
    part = {k: v for k, v in r50_source.items() if k.startswith(PRED + "decoder.layers.0.")}
    path = str(tmp_path / "maskdino.pkl")
    with open(path, "wb") as f:  # detectron2 model-zoo layout
        pickle.dump({"model": {k: v.numpy() for k, v in part.items()}, "__author__": "test"}, f)
    loaded = cm.load_maskdino_checkpoint(path)
    assert loaded.keys() == part.keys()
    assert all(torch.equal(loaded[k], v) for k, v in part.items())


def test_wrong_files_give_clear_errors(tmp_path, r50_model, r50_source):
    path = str(tmp_path / "random.pth")
    torch.save({"layer.weight": torch.zeros(3, 3), "step": 3}, path)
    with pytest.raises(ValueError, match="not a Mask DINO checkpoint"):
        cli.main(["--config-file", R50_CONFIG, "--input", path, "--output", str(tmp_path / "o.pth")])
    assert not os.path.exists(tmp_path / "o.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        cli.main(["--config-file", R50_CONFIG, "--input", str(tmp_path / "nowhere.pth"),
                  "--output", str(tmp_path / "o.pth")])
    odd = dict(r50_source)
    odd[PIX + "transformer.level_embed"] = torch.zeros(5, 256)
    with pytest.raises(ValueError, match="level_embed has 5 levels"):
        cm.convert_maskdino(odd, r50_model)
    with pytest.raises(ValueError, match="--feature-order"):
        cm.detect_source_levels({PIX + "input_proj.0.0.weight": torch.zeros(256, 512, 1, 1),
                                 PIX + "transformer.level_embed": torch.zeros(1, 256)})
    with pytest.raises(ValueError, match=r"\.pth"):
        cm.save_converted({}, str(tmp_path / "out.pkl"), path)
