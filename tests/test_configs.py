"""Every model config in configs/ builds a model on CPU (no weights, no data needed)."""
import glob
import os

import pytest

import unip_v2  # noqa: F401  first: makes detectron2 importable

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from unip_v2 import add_unip_v2_config
from unip_v2.modeling.text_encoder import train_byte_level_bpe

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
