"""Load a local file of ImageNet weights into a built backbone (MODEL.BACKBONE.PRETRAINED).

Supported pairs:
* detectron2 ``ResNet`` (``build_resnet_backbone``) <- a torchvision ResNet state dict
  (``conv1``/``bn1``/``layer{k}.{b}.conv{j}``/``bn{j}``/``downsample.{0,1}``; ``fc`` dropped),
  a detectron2-named state dict or ``.pkl`` (``{"model": ...}``, numpy arrays allowed), or
  Caffe2/MSRA names (``res2_0_branch2a_w``...; renamed by detectron2's own
  ``convert_basic_c2_names``);
* ``SwinBackbone`` <- a timm SwinTransformer state dict, or the official Swin release
  (``{"model": ...}``, PatchMerging at the *end* of stage i as ``layers.{i}.downsample``,
  which timm 1.0 and this backbone keep at the *start* of stage i+1).

Files: ``.pth``/``.pt`` (torch.load, weights only), ``.pkl`` (detectron2's model-zoo pickles, through a
restricted unpickler that accepts only tensors, arrays and containers) and ``.safetensors``. Tensors are copied in place by name, never through
``load_state_dict``, so modules the file does not cover keep their values (detectron2's
FrozenBatchNorm2d would otherwise reset running stats it does not find). Returns a report::

    {"loaded":        [model keys filled],
     "missing":       [model keys the file has nothing for],
     "unexpected":    [file keys with no place in the model],
     "shape_mismatch":["file key -> model key: file (..) vs model (..)"],
     "interpolated":  ["model key: window a -> b (bicubic)"],   # Swin bias tables
     "ignored":       [file keys with no counterpart by design: classifier heads, Swin's
                       final norm, buffers timm rebuilds, BatchNorm's num_batches_tracked]}
"""
import logging
import os
import pickle
import re
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.checkpoint.c2_model_loading import convert_basic_c2_names
from detectron2.modeling.backbone.resnet import BottleneckBlock, ResNet
from fvcore.common.checkpoint import get_missing_parameters_message, get_unexpected_parameters_message

from ...utils.safe_pickle import load_pickle
from .swin import SwinBackbone

__all__ = ["convert_backbone_weights", "load_backbone_pretrained", "read_weights_file"]

logger = logging.getLogger(__name__)

_SUFFIXES = (".pth", ".pt", ".pkl", ".safetensors")
# Containers that checkpoints wrap their state dict in (official Swin: "model"; Caffe2
# detection files: "blobs"; many training scripts: "state_dict").
_CONTAINER_KEYS = ("model", "state_dict", "model_state", "blobs")
# Prefixes of wrapped models (DataParallel, a detector's backbone) stripped when every
# key carries them.
_WRAPPER_PREFIXES = ("module.", "backbone.")
# BatchNorm's step counter: nothing reads it in eval or with momentum set, and
# FrozenBatchNorm2d has none, so it is neither loaded nor reported missing.
_BN_COUNTER = "num_batches_tracked"
# {model name: (file name, tensor)}: a checkpoint renamed to the backbone's names.
Source = Dict[str, Tuple[str, torch.Tensor]]


def _to_tensor(value) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    return None


def read_weights_file(path: str) -> Dict[str, torch.Tensor]:
    """Read a local weights file into {name: tensor} (on CPU), unwrapping containers.

    Raises FileNotFoundError if `path` is not a file, ValueError for an unknown suffix or
    a file holding no tensors.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path!r}")
    if path.endswith(".pkl"):
        # only tensors, arrays and containers: unpickling anything else could run code
        data = load_pickle(path)
    elif path.endswith((".pth", ".pt")):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path!r} holds Python objects besides tensors and is not loaded "
                             f"(weights_only); re-save just its state dict. ({e})") from e
    elif path.endswith(".safetensors"):
        from safetensors.torch import load_file

        data = load_file(path, device="cpu")
    else:
        raise ValueError(f"weights file {path!r} must end with one of {_SUFFIXES}")

    for _ in range(2):  # e.g. {"model": {"state_dict": ...}}
        if isinstance(data, dict):
            inner = [data[k] for k in _CONTAINER_KEYS if isinstance(data.get(k), dict)]
            if inner:
                data = inner[0]
    if not isinstance(data, dict):
        raise ValueError(f"{path!r} holds a {type(data).__name__}, not a dict of tensors")
    weights = {}
    for name, value in data.items():
        tensor = _to_tensor(value)
        # Caffe2 files keep SGD momentum next to each blob; metadata entries are not tensors.
        if tensor is not None and not str(name).endswith("_momentum"):
            weights[str(name)] = tensor
    if not weights:
        raise ValueError(f"{path!r} contains no tensors (top-level keys: {sorted(map(str, data))[:10]})")
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix):]: v for k, v in weights.items()}
    return weights


# ---------------------------------------------------------------- ResNet names

def _torchvision_to_d2(name: str) -> Optional[str]:
    """torchvision ResNet key -> detectron2 ResNet key (layer{k} is res{k+1}); None if the
    key is not a torchvision backbone key."""
    m = re.match(r"^layer(\d)\.(\d+)\.(.+)$", name)
    if m is None:
        if name == "conv1.weight":
            return "stem.conv1.weight"
        m = re.match(r"^bn1\.(\w+)$", name)
        return f"stem.conv1.norm.{m.group(1)}" if m else None
    stage, block, rest = f"res{int(m.group(1)) + 1}", m.group(2), m.group(3)
    for pattern, target in (
        (r"^conv(\d)\.weight$", r"conv\1.weight"),
        (r"^bn(\d)\.(\w+)$", r"conv\1.norm.\2"),
        (r"^downsample\.0\.weight$", "shortcut.weight"),
        (r"^downsample\.1\.(\w+)$", r"shortcut.norm.\1"),
    ):
        if re.match(pattern, rest):
            return f"{stage}.{block}." + re.sub(pattern, target, rest)
    return None


def _is_caffe2_name(name: str) -> bool:
    # Caffe2 blobs are flat names joined by "_" ("res2_0_branch2a_w"), never dotted.
    return "." not in name and "_" in name


def _resnet_source(weights: Dict[str, torch.Tensor]) -> Tuple[Source, List[str], str]:
    """Rename a ResNet checkpoint to detectron2 names.

    Returns ({d2 name: (file name, tensor)}, ignored file names, detected layout).
    """
    names = list(weights)
    caffe2 = [n for n in names if _is_caffe2_name(n)]
    renamed = dict(zip(caffe2, convert_basic_c2_names(caffe2))) if caffe2 else {}
    torchvision = False
    source, ignored = {}, []
    for name in names:
        if name in renamed:
            new = renamed[name]
        else:
            new = _torchvision_to_d2(name)
            torchvision |= new is not None
            new = new or name
        # Classifiers of every layout: torchvision "fc", Caffe2 "fc1000"/"pred", d2 "linear".
        if re.match(r"^(fc\d*|linear|pred)\.", new) or new.endswith(_BN_COUNTER):
            ignored.append(name)
            continue
        source[new] = (name, weights[name])
    layout = "torchvision" if torchvision else ("caffe2" if caffe2 else "detectron2")
    return source, ignored, layout


def _warn_torchvision_stride(backbone: ResNet) -> None:
    for module in backbone.modules():
        if isinstance(module, BottleneckBlock) and module.conv1.stride != (1, 1):
            logger.warning(
                "torchvision ResNet weights put the stride in the 3x3 conv, but this ResNet has "
                "it in the 1x1 (MODEL.RESNETS.STRIDE_IN_1X1 True); set it False for these "
                "weights, and use torchvision's RGB pixel mean/std.")
            return


# ---------------------------------------------------------------- Swin names

def _swin_source(weights: Dict[str, torch.Tensor]) -> Tuple[Source, List[str], str]:
    """Rename a Swin checkpoint (timm or official layout) to SwinBackbone names.

    Returns ({model name: (file name, tensor)}, ignored file names, detected layout).
    """
    # Stage 0 never downsamples in timm, so a stage-0 PatchMerging marks the official layout.
    official = any(k.startswith("layers.0.downsample.") for k in weights)
    source, ignored = {}, []
    for name, tensor in weights.items():
        # Buffers timm recomputes (non-persistent there), the classifier, and the final
        # norm that timm/official apply to the last stage before pooling (the backbone has
        # a fresh norm per output instead, like the official detection Swin).
        if (name.endswith(("relative_position_index", "attn_mask")) or name.startswith("head.")
                or name.startswith("norm.")):
            ignored.append(name)
            continue
        new = name
        if official:
            new = re.sub(r"^layers\.(\d+)\.downsample\.",
                         lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", name)
        source[new] = (name, tensor)
    return source, ignored, "official" if official else "timm"


def _resize_bias_table(table: torch.Tensor, target_shape: torch.Size) -> Optional[torch.Tensor]:
    """((2a-1)**2, heads) -> ((2b-1)**2, heads) by bicubic resampling of the (2a-1)^2 grid of
    relative offsets; None when the two are not square tables with the same heads."""
    (n_src, heads), (n_dst, heads_dst) = table.shape, target_shape
    side_src, side_dst = round(n_src ** 0.5), round(n_dst ** 0.5)
    if heads != heads_dst or side_src ** 2 != n_src or side_dst ** 2 != n_dst:
        return None
    grid = table.float().t().reshape(1, heads, side_src, side_src)
    grid = F.interpolate(grid, size=(side_dst, side_dst), mode="bicubic", align_corners=False)
    return grid.reshape(heads, n_dst).t().to(table.dtype)


def _swin_resize(key: str, value: torch.Tensor, target: torch.Tensor) -> Optional[Tuple[torch.Tensor, str]]:
    if not key.endswith("relative_position_bias_table") or value.dim() != 2 or target.dim() != 2:
        return None
    resized = _resize_bias_table(value, target.shape)
    if resized is None:
        return None
    window_src = (round(value.shape[0] ** 0.5) + 1) // 2
    window_dst = (round(target.shape[0] ** 0.5) + 1) // 2
    return resized, f"{key}: window {window_src} -> {window_dst} (bicubic)"


# ---------------------------------------------------------------- copy + report

Resizer = Callable[[str, torch.Tensor, torch.Tensor], Optional[Tuple[torch.Tensor, str]]]


def _match(model: nn.Module, source: Source, resize: Optional[Resizer]
           ) -> Tuple[Dict[str, List[str]], List[Tuple[torch.Tensor, torch.Tensor]]]:
    """Pair model tensors with file tensors by name; nothing is written yet.

    Returns (report without "ignored", [(model tensor, value to copy into it)]).
    """
    targets = model.state_dict(keep_vars=True)
    report = {"loaded": [], "missing": [], "unexpected": [], "shape_mismatch": [], "interpolated": []}
    plan = []
    for key, target in targets.items():
        if key.endswith(_BN_COUNTER):
            continue
        if key not in source:
            report["missing"].append(key)
            continue
        file_key, value = source[key]
        if value.shape != target.shape:
            resized = resize(key, value, target) if resize else None
            if resized is None:
                report["shape_mismatch"].append(
                    f"{file_key} -> {key}: file {tuple(value.shape)} vs model {tuple(target.shape)}")
                continue
            value, note = resized
            report["interpolated"].append(note)
        plan.append((target, value))
        report["loaded"].append(key)
    report["unexpected"] = sorted(file_key for key, (file_key, _) in source.items() if key not in targets)
    return report, plan


def convert_backbone_weights(backbone: nn.Module, weights: Dict[str, torch.Tensor]
                             ) -> Tuple[Dict[str, torch.Tensor], Dict[str, List[str]], str]:
    """Rename (and, for Swin bias tables, resample) a checkpoint's tensors to `backbone`'s
    state-dict names without touching the backbone: the pure half of
    `load_backbone_pretrained`, also used by converters of whole detectors whose backbone
    part is one of the supported layouts.

    `weights`: {name: tensor} as `read_weights_file` returns it (no wrapper prefix).
    Returns ({backbone key: tensor of the backbone's shape}, the report described in the
    module docstring, the detected layout). Raises TypeError for a backbone other than
    detectron2 ``ResNet`` / ``SwinBackbone``.
    """
    if isinstance(backbone, SwinBackbone):
        source, ignored, layout = _swin_source(weights)
        resize = _swin_resize
    elif isinstance(backbone, ResNet):
        source, ignored, layout = _resnet_source(weights)
        resize = None
        if layout == "torchvision":
            _warn_torchvision_stride(backbone)
    else:
        raise TypeError(f"backbone weights: supported backbones are detectron2 ResNet and "
                        f"SwinBackbone, got {type(backbone).__name__}")
    report, plan = _match(backbone, source, resize)
    report["ignored"] = sorted(ignored)
    # _match lists the loaded keys in the order of its plan.
    converted = {key: value for key, (_, value) in zip(report["loaded"], plan)}
    return converted, report, layout


def load_backbone_pretrained(backbone: nn.Module, path: str) -> Dict[str, List[str]]:
    """Copy ImageNet weights from the local file `path` into `backbone`, in place.

    `backbone` is a detectron2 ``ResNet`` or a ``SwinBackbone``. Tensors whose shape
    differs are reported and skipped (Swin relative-position tables of another window size
    are resampled instead). Returns the report described in the module docstring.

    Raises FileNotFoundError naming `path` if it does not exist, TypeError for another
    backbone class, ValueError if no tensor of the file fits, or more clash in shape than
    fit (the file is for another backbone); the backbone is then left untouched.
    """
    weights = read_weights_file(path)
    converted, report, layout = convert_backbone_weights(backbone, weights)
    name = type(backbone).__name__
    # More shape clashes than fits means the file is for another size of this family
    # (e.g. Swin-B weights for a Swin-T, where only the bias tables fit by chance).
    if not report["loaded"] or len(report["shape_mismatch"]) > len(report["loaded"]):
        detail = (f"; {len(report['shape_mismatch'])} names matched with other shapes, e.g. "
                  f"{report['shape_mismatch'][0]}") if report["shape_mismatch"] else ""
        raise ValueError(
            f"only {len(report['loaded'])} of the {len(weights)} tensors in {path!r} ({layout} "
            f"layout, e.g. {sorted(weights)[:3]}) fit this {name} (keys e.g. "
            f"{sorted(backbone.state_dict())[:3]}){detail}; is it the file for this backbone? "
            "Nothing was loaded.")
    targets = backbone.state_dict(keep_vars=True)
    with torch.no_grad():
        # In place (not load_state_dict): modules the file does not cover keep their values.
        for key, value in converted.items():
            targets[key].copy_(value.to(dtype=targets[key].dtype, device=targets[key].device))

    logger.info(f"Loaded {len(report['loaded'])} tensors of {name} from {path} ({layout} layout); "
                f"ignored {len(report['ignored'])} (classifier/bookkeeping)")
    if report["interpolated"]:
        logger.info("Resampled for another window size:\n" + "\n".join(report["interpolated"]))
    if report["missing"]:
        logger.warning(get_missing_parameters_message(report["missing"]))
    if report["unexpected"]:
        logger.warning(get_unexpected_parameters_message(report["unexpected"]))
    if report["shape_mismatch"]:
        logger.warning("Skipped for their shape:\n" + "\n".join(report["shape_mismatch"]))
    return report
