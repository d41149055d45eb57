"""Every model config in configs/ builds a model on CPU (no weights, no data needed)."""
import glob
import os

import pytest

import unip_v2  # noqa: F401  first: makes detectron2 importable

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from unip_v2 import add_unip_v2_config
from unip_v2.modeling.text_encoder import train_byte_level_bpe

import config_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Base-*.yaml and the backbone presets in swin/ are fragments that leaves build on.
LEAVES = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
                if not os.path.basename(p).startswith("Base-")
                and os.sep + "swin" + os.sep not in p)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    # the real configs name a local RoBERTa directory; any byte-level BPE builds the model
    out = str(tmp_path_factory.mktemp("tok"))
    train_byte_level_bpe(["a red circle", "a blue square"] * 3, out, vocab_size=280,
                         min_frequency=1)
    return out


def test_there_are_leaf_configs():
    names = {os.path.relpath(p, os.path.join(REPO, "configs")) for p in LEAVES}
    assert {"uni_perceiver_v2/R50.yaml", "uni_perceiver_v2/Swin-B.yaml",
            "uni_perceiver_v2/Swin-L.yaml", "proposal_network/R50_coco.yaml",
            "toy/proposal_network_R50_tiny.yaml", "toy/uni_perceiver_v2_R50_tiny.yaml"} <= names


@pytest.mark.parametrize("path", LEAVES, ids=lambda p: os.path.relpath(p, REPO))
def test_config_builds_a_model(path, tokenizer_dir):
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.TEXT_ENCODER.TOKENIZER = tokenizer_dir
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ("toy_shapes_val",)  # registered names only
    model = build_model(cfg)
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE
    assert sum(p.numel() for p in model.parameters()) > 0


# ------------------------------------------------------- the values README promises
# README, "Training on COCO": configs/uni_perceiver_v2/{R50,Swin-B,Swin-L}.yaml carry the
# paper's values (Uni-Perceiver v2, Table 7 and Sec. 5.2): 300 (R50) / 900 (Swin)
# proposal-network queries, top 200 proposals, unified decoder 6 x 768 (12 heads, FFN 3072,
# drop-path 0.1) with 8 experts (top 2), AdamW at 1e-4 with weight decay 1e-4, pretrained
# encoders at 0.1x, resize 200-1800 with a 1600 crop (scales 200 / 1600 = 0.125 and
# 1800 / 1600 = 1.125), test at 1400-1600; a RoBERTa-base text encoder (12 x 768, 12 heads,
# FFN 3072). The region proposal network at Table 7's sizes (README "Image encoder speed":
# 12 deformable layers = 6 encoder + 6 decoder, FFN 2048; 4 levels, strides 8-64; masks
# supervised at 112 x 112 = 12544 points). Every value here is a literal, none read from
# the files.
_RPN = {
    "MODEL.IMAGE_ENCODER.HIDDEN_DIM": 256, "MODEL.IMAGE_ENCODER.NHEADS": 8,
    "MODEL.IMAGE_ENCODER.ENC_LAYERS": 6, "MODEL.IMAGE_ENCODER.DEC_LAYERS": 6,
    "MODEL.IMAGE_ENCODER.DIM_FEEDFORWARD": 2048, "MODEL.IMAGE_ENCODER.NUM_FEATURE_LEVELS": 4,
    "MODEL.IMAGE_ENCODER.LOSS.TRAIN_NUM_POINTS": 12544,
}
_COCO_INPUT = {
    "INPUT.IMAGE_SIZE": 1600, "INPUT.MIN_SCALE": 0.125, "INPUT.MAX_SCALE": 1.125,
    "INPUT.MIN_SIZE_TEST": 1400, "INPUT.MAX_SIZE_TEST": 1600,
}
_GENERALIST = {
    **_RPN, **_COCO_INPUT,
    "MODEL.META_ARCHITECTURE": "UniPerceiverV2",
    "MODEL.IMAGE_ENCODER.TOPK_PROPOSALS": 200,
    "MODEL.IMAGE_ENCODER.OUTPUT_DIM": 768, "MODEL.TEXT_ENCODER.OUTPUT_DIM": 768,
    "MODEL.TEXT_ENCODER.HIDDEN_SIZE": 768, "MODEL.TEXT_ENCODER.NUM_LAYERS": 12,
    "MODEL.TEXT_ENCODER.NUM_HEADS": 12, "MODEL.TEXT_ENCODER.INTERMEDIATE_SIZE": 3072,
    "MODEL.UNIFIED_DECODER.DEPTH": 6, "MODEL.UNIFIED_DECODER.WIDTH": 768,
    "MODEL.UNIFIED_DECODER.NUM_HEADS": 12, "MODEL.UNIFIED_DECODER.FFN_DIM": 3072,
    "MODEL.UNIFIED_DECODER.DROP_PATH": 0.1, "MODEL.UNIFIED_DECODER.MOE.ENABLED": True,
    "MODEL.UNIFIED_DECODER.MOE.NUM_EXPERTS": 8, "MODEL.UNIFIED_DECODER.MOE.TOP_K": 2,
    "SOLVER.OPTIMIZER": "ADAMW", "SOLVER.BASE_LR": 1e-4, "SOLVER.WEIGHT_DECAY": 1e-4,
    "SOLVER.BACKBONE_MULTIPLIER": 0.1, "SOLVER.TEXT_ENCODER_MULTIPLIER": 0.1,
    "SOLVER.IMAGE_ENCODER_MULTIPLIER": 1.0,   # the proposal network trains from scratch
    "SOLVER.WEIGHT_DECAY_BIAS": 0.0, "SOLVER.WEIGHT_DECAY_NORM": 0.0,
    "SOLVER.WEIGHT_DECAY_EMBED": 0.0,
}
# Table 8: samples per process and loss weights w_k (captioning 0.5 and retrieval 1.0 are the
# sums over the six datasets; retrieval's 1.0 is two directions of 0.5); 224 px inputs for R50
# in the non-detection tasks (Sec. 5.2), 384 px for Swin
_TABLE_8 = {
    "MODEL.DETECTION.BATCH_SIZE": 1,
    "MODEL.CLASSIFICATION.BATCH_SIZE": 28, "MODEL.CLASSIFICATION.LOSS_WEIGHT": 1.0,
    "MODEL.RETRIEVAL.BATCH_SIZE": 28, "MODEL.RETRIEVAL.LOSS_WEIGHT": 0.5,
    "MODEL.CAPTIONING.BATCH_SIZE": 24, "MODEL.CAPTIONING.LOSS_WEIGHT": 0.5,
    "MODEL.MLM.BATCH_SIZE": 256, "MODEL.MLM.LOSS_WEIGHT": 0.5,
}
_GENERALIST.update(_TABLE_8)


def _task_image_size(side):
    return {f"MODEL.{t}.IMAGE_SIZE": side for t in ("CLASSIFICATION", "RETRIEVAL", "CAPTIONING")}


_R50 = {"MODEL.BACKBONE.NAME": "build_resnet_backbone", "MODEL.RESNETS.DEPTH": 50}
# Swin-B / Swin-L (Liu et al. 2021, 384-px ImageNet-22k models: window 12)
_SWIN_B = {"MODEL.BACKBONE.NAME": "build_swin_backbone", "MODEL.SWIN.EMBED_DIM": 128,
           "MODEL.SWIN.DEPTHS": [2, 2, 18, 2], "MODEL.SWIN.NUM_HEADS": [4, 8, 16, 32],
           "MODEL.SWIN.WINDOW_SIZE": 12}
_SWIN_L = {**_SWIN_B, "MODEL.SWIN.EMBED_DIM": 192, "MODEL.SWIN.NUM_HEADS": [6, 12, 24, 48]}
PROMISED = {
    "uni_perceiver_v2/R50.yaml": {**_GENERALIST, **_R50, **_task_image_size(224),
                                  "MODEL.IMAGE_ENCODER.NUM_QUERIES": 300},
    "uni_perceiver_v2/Swin-B.yaml": {**_GENERALIST, **_SWIN_B, **_task_image_size(384),
                                     "MODEL.IMAGE_ENCODER.NUM_QUERIES": 900},
    "uni_perceiver_v2/Swin-L.yaml": {**_GENERALIST, **_SWIN_L, **_task_image_size(384),
                                     "MODEL.IMAGE_ENCODER.NUM_QUERIES": 900},
    # README: the R50 region proposal network at Table 7's sizes, 300 queries, the paper's
    # detection augmentation; Mask DINO's optimiser (AdamW 1e-4, weight decay 0.05,
    # backbone 0.1x, full-model gradient clipping at 0.01)
    "proposal_network/R50_coco.yaml": {
        **_RPN, **_COCO_INPUT, **_R50,
        "MODEL.META_ARCHITECTURE": "UniPerceiverV2ProposalNetwork",
        "MODEL.IMAGE_ENCODER.NUM_QUERIES": 300, "SOLVER.OPTIMIZER": "ADAMW",
        "SOLVER.BASE_LR": 1e-4, "SOLVER.WEIGHT_DECAY": 0.05, "SOLVER.BACKBONE_MULTIPLIER": 0.1,
        "SOLVER.CLIP_GRADIENTS.ENABLED": True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "full_model",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 0.01},
    # README, toy runs: a 1/4-width ResNet-50 from scratch under a 2 + 3-layer region
    # proposal network, d = 64, 100 queries; the generalist adds a 2-layer 64-wide RoBERTa
    # and a 2 x 128 unified decoder with 8-expert conditional MoE, 600 iterations of 8 images
    "toy/proposal_network_R50_tiny.yaml": {
        "MODEL.META_ARCHITECTURE": "UniPerceiverV2ProposalNetwork", "MODEL.RESNETS.DEPTH": 50,
        "MODEL.RESNETS.STEM_OUT_CHANNELS": 16, "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
        "MODEL.IMAGE_ENCODER.ENC_LAYERS": 2, "MODEL.IMAGE_ENCODER.DEC_LAYERS": 3,
        "MODEL.IMAGE_ENCODER.HIDDEN_DIM": 64, "MODEL.IMAGE_ENCODER.NUM_QUERIES": 100,
        "SOLVER.IMS_PER_BATCH": 8, "SOLVER.BACKBONE_MULTIPLIER": 1.0},
    "toy/uni_perceiver_v2_R50_tiny.yaml": {
        "MODEL.META_ARCHITECTURE": "UniPerceiverV2", "MODEL.RESNETS.DEPTH": 50,
        "MODEL.RESNETS.STEM_OUT_CHANNELS": 16, "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
        "MODEL.IMAGE_ENCODER.ENC_LAYERS": 2, "MODEL.IMAGE_ENCODER.DEC_LAYERS": 3,
        "MODEL.IMAGE_ENCODER.HIDDEN_DIM": 64, "MODEL.IMAGE_ENCODER.NUM_QUERIES": 100,
        "MODEL.TEXT_ENCODER.NUM_LAYERS": 2, "MODEL.TEXT_ENCODER.HIDDEN_SIZE": 64,
        "MODEL.UNIFIED_DECODER.DEPTH": 2, "MODEL.UNIFIED_DECODER.WIDTH": 128,
        "MODEL.UNIFIED_DECODER.MOE.ENABLED": True, "MODEL.UNIFIED_DECODER.MOE.NUM_EXPERTS": 8,
        "SOLVER.MAX_ITER": 600, "SOLVER.IMS_PER_BATCH": 8, "SOLVER.BACKBONE_MULTIPLIER": 1.0,
        "SOLVER.TEXT_ENCODER_MULTIPLIER": 1.0},
}


def _lookup(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("path", sorted(PROMISED))
def test_config_has_the_promised_values(path):
    cfg = config_models.load_config(path)
    wrong = {}
    for key, want in PROMISED[path].items():
        got = _lookup(cfg, key)
        if isinstance(want, float):
            ok = got == pytest.approx(want, rel=1e-12)
        else:
            ok = type(got) is type(want) and got == want
        if not ok:
            wrong[key] = (got, want)
    assert wrong == {}, wrong


def _blocks(shapes, prefix):
    """How many numbered children prefix.<i>. has, from parameter names."""
    return len({n[len(prefix):].split(".")[0] for n in shapes if n.startswith(prefix)})


@pytest.mark.parametrize("path", ["uni_perceiver_v2/R50.yaml", "uni_perceiver_v2/Swin-B.yaml",
                                  "uni_perceiver_v2/Swin-L.yaml",
                                  "proposal_network/R50_coco.yaml"])
def test_paper_model_has_the_paper_sizes(path):
    """The values reach the model: parameter shapes and counts of the model the config builds
    (on the meta device), against the numbers above worked out by hand."""
    model = config_models.meta_model(path)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    queries = 300 if "R50" in path else 900
    ie = "image_encoder."
    assert shapes[ie + "proposal_decoder.query_embed.weight"] == (queries, 256)
    assert model.image_encoder.proposal_decoder.num_queries == queries
    assert model.image_encoder.region_proposals.topk == 200
    assert _blocks(shapes, ie + "pixel_encoder.encoder.layers.") == 6
    assert _blocks(shapes, ie + "proposal_decoder.decoder.layers.") == 6
    assert shapes[ie + "pixel_encoder.level_embed"] == (4, 256)                  # 4 levels
    assert shapes[ie + "pixel_encoder.encoder.layers.0.linear1.weight"] == (2048, 256)
    # sampling offsets: 8 heads x 4 levels x 4 points x (x, y) = 256 outputs
    assert shapes[ie + "proposal_decoder.decoder.layers.0.cross_attn.sampling_offsets.weight"
                  ] == (256, 256)
    criterion = model.tasks["detection"].criterion if hasattr(model, "tasks") else model.criterion
    assert criterion.num_points == 112 * 112
    if "Swin" in path:
        c, heads = (128, 4) if "Swin-B" in path else (192, 6)
        assert shapes[ie + "backbone.patch_embed.proj.weight"] == (c, 3, 4, 4)
        assert [_blocks(shapes, f"{ie}backbone.layers.{i}.blocks.") for i in range(4)] == [
            2, 2, 18, 2]
        # (2 x window - 1)^2 = 23^2 = 529 relative positions for a 12 x 12 window
        assert shapes[ie + "backbone.layers.0.blocks.0.attn.relative_position_bias_table"] == (
            529, heads)
    else:   # ResNet-50: 3, 4, 6, 3 bottleneck blocks
        assert [_blocks(shapes, f"{ie}backbone.res{i}.") for i in range(2, 6)] == [3, 4, 6, 3]
    if "uni_perceiver_v2" not in path:
        return
    ud = "unified_decoder."
    assert _blocks(shapes, ud + "layers.") == 6
    assert shapes[ud + "layers.0.attn.qkv.weight"] == (3 * 768, 768)
    assert shapes[ud + "layers.5.ffn.fc1_weight"] == (8, 3072, 768)            # 8 experts
    assert model.unified_decoder.layers[0].ffn.gate.top_k == 2
    assert model.unified_decoder.layers[0].drop_path.drop_prob == pytest.approx(0.1)
    assert model.unified_decoder.layers[0].attn.heads == 12
    assert _blocks(shapes, "text_encoder.roberta.encoder.layer.") == 12
    assert shapes["text_encoder.roberta.encoder.layer.0.intermediate.dense.weight"] == (3072, 768)
    assert shapes["image_encoder.region_proposals.output_proj.weight"] == (768, 256)
