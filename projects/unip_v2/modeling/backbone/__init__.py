"""Backbones: detectron2's ResNet is used as is; Swin comes from timm.

Importing this package registers ``build_swin_backbone`` in detectron2's BACKBONE_REGISTRY;
``load_backbone_pretrained`` fills a built backbone from MODEL.BACKBONE.PRETRAINED.
"""
from .pretrained import load_backbone_pretrained, read_weights_file
from .swin import SWIN_STAGE_NAMES, SwinBackbone, build_swin_backbone

__all__ = [
    "SWIN_STAGE_NAMES",
    "SwinBackbone",
    "build_swin_backbone",
    "load_backbone_pretrained",
    "read_weights_file",
]
