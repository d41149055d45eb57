"""The repository's configs and the models they build, for tests that check parameter names,
shapes and optimiser groups. Models are built on the meta device (names and shapes, no
storage: about a second each, even for Swin-L) and cached for the test process; do not
modify them."""
import atexit
import functools
import os
import shutil
import tempfile

import torch

import unip_v2  # noqa: F401  (first: makes detectron2 importable)

from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY

from unip_v2 import add_unip_v2_config
from unip_v2.modeling.text_encoder import train_byte_level_bpe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the paper's models (Uni-Perceiver v2, Table 7) and the toy ones
PAPER_CONFIGS = ("uni_perceiver_v2/R50.yaml", "uni_perceiver_v2/Swin-B.yaml",
                 "uni_perceiver_v2/Swin-L.yaml", "proposal_network/R50_coco.yaml")
TOY_CONFIGS = ("toy/uni_perceiver_v2_R50_tiny.yaml", "toy/proposal_network_R50_tiny.yaml")


@functools.lru_cache(maxsize=None)
def tokenizer_dir() -> str:
    """A tiny byte-level BPE: the configs name a local RoBERTa / toy tokenizer directory; any
    BPE builds the model (the vocabulary size changes one shape, no name)."""
    out = tempfile.mkdtemp(prefix="unip_v2_tok_")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    train_byte_level_bpe(["a red circle", "a blue square"] * 3, out, vocab_size=280,
                         min_frequency=1)
    return out


def load_config(rel_path: str):
    """The config file configs/<rel_path> (a fresh, mutable CfgNode), made buildable here:
    CPU, the tiny tokenizer, a registered dataset for the category names."""
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", rel_path))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.TEXT_ENCODER.TOKENIZER = tokenizer_dir()
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ("toy_shapes_val",)
    return cfg


@functools.lru_cache(maxsize=None)
def meta_model(rel_path: str) -> torch.nn.Module:
    """The config's model, every parameter on the meta device (shared: read it only)."""
    cfg = load_config(rel_path)
    with torch.device("meta"):
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    return model
