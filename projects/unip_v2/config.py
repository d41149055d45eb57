"""unip-v2's config keys, added on top of detectron2's defaults.

Usage::

    from detectron2.config import get_cfg
    from unip_v2 import add_unip_v2_config

    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file("configs/Base-UniPerceiverV2.yaml")

Every key gets a comment saying what it does (tests/test_project_setup.py enforces it).
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_unip_v2_config"]


def add_unip_v2_config(cfg: CN) -> None:
    """Add unip-v2's keys (with their defaults) to a detectron2 config, in place."""
    # Multi-scale deformable attention, the op of the region proposal network's
    # deformable encoder and decoder (unip_v2/layers/ms_deform_attn.py).
    cfg.MODEL.MS_DEFORM_ATTN = CN()
    # Implementation: "auto" | "reference" | "cpu" | "cuda". "auto" takes the compiled
    # kernel for the tensors' device when unip_v2._C has it, else the pure-PyTorch
    # reference. The environment variable UNIP_V2_MSDA_BACKEND overrides this key; see
    # unip_v2/layers/ms_deform_attn_backend.py.
    cfg.MODEL.MS_DEFORM_ATTN.BACKEND = "auto"
