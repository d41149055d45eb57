"""Converting other projects' checkpoints into unip-v2 models (as detectron2's own
``detectron2.checkpoint`` converts Caffe2 ones). Not imported by ``import unip_v2``: load
what you need, e.g. ``from unip_v2.checkpoint.maskdino import convert_maskdino``."""
