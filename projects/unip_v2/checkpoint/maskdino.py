r"""Mask DINO checkpoints onto unip-v2's image encoder (region proposal network).

Mask DINO is IDEA-Research/MaskDINO (detectron2 .pth or model-zoo .pkl); its backbone, pixel
decoder and predictor become unip-v2's backbone, pixel encoder and proposal decoder.
``tools/convert_maskdino.py`` is the command line around this module:

    source = load_maskdino_checkpoint("maskdino_r50.pth")
    model = build_target_model("configs/proposal_network/R50_coco.yaml")
    state, report = convert_maskdino(source, model, decoder_layers=None, class_head="mean")
    save_converted(state, "unip_v2_r50_from_maskdino.pth", "maskdino_r50.pth")
    print(format_report(report))

The target model is built from the config on CPU, so every key and shape of the output
is the model's own: the output ``{"model": ..., "matching_heuristics": False}`` loads
through detectron2's DetectionCheckpointer (MODEL.WEIGHTS) with no missing or unexpected
key. The report (printed; ``--report-json``) lists every checkpoint key dropped, with the
reason, and every model key initialised from the freshly built model instead of the
checkpoint (``query_embed``, ``region_proposals.*``, ``global_tokens.*``: Mask DINO has no
counterpart).

Mapping:
* Names: ``backbone.*`` through unip_v2's backbone loader (detectron2 ResNet names as they
  are; Mask DINO's D2SwinTransformer in the official Swin layout onto the timm-based
  SwinBackbone), ``sem_seg_head.pixel_decoder.*`` -> ``pixel_encoder.*``
  (``transformer.`` dropped), ``sem_seg_head.predictor.*`` -> ``proposal_decoder.*``.
  Aliases of Mask DINO's shared modules (``decoder.norm`` = ``decoder_norm``;
  ``bbox_embed.{i}`` = ``decoder.bbox_embed.{i}`` = ``_bbox_embed``) are checked to be equal
  and taken once. ``criterion.empty_weight`` is dropped.
* Levels: unip-v2 orders levels fine to coarse (stride 8 first) in the encoder, the
  decoder's cross-attention and the two-stage anchors. Mask DINO's order depends on
  FEATURE_ORDER, which is detected from the in-channels of its 1x1 input projections
  (increasing: "low2high", encoder s8, s16, s32, s64; decreasing: "high2low", encoder
  coarse to fine); its decoder reads the levels in the reverse of its encoder order. The
  input projections, ``level_embed`` and the per-level blocks of every MSDeformAttn's
  ``sampling_offsets`` (weight viewed (heads, levels, points, 2, d)) and
  ``attention_weights`` ((heads, levels, points, d)) are permuted into unip-v2's order.
  Levels unip-v2 does not have (the stride-4 level of the "4s" Swin-L checkpoints,
  surplus coarse levels) are dropped everywhere and the rest renumbered; ``adapter_1``
  on res2 is kept.
* Decoder depth: the layers named by ``--decoder-layers`` (default the first
  DEC_LAYERS); the box MLP is shared by all layers, so nothing else changes.
* Class head: Mask DINO has 80 class logits, unip-v2 one objectness logit. ``mean``
  (default): ``class_embed`` weight = mean of the 80 rows, bias = logsumexp of the 80
  biases (for a token scoring alike on every class, sigmoid(logsumexp) approximates the
  probability that some class fires, the sum of the small per-class probabilities);
  ``label_enc`` (denoising content) = mean of its 80 rows. ``fresh``: both keep the
  freshly built model's initialisation (objectness prior 0.01).

Conventions. Where unip-v2's proposal path deliberately differs from Mask DINO's, a config
key switches it (``ProposalDecoder`` says why each default is what it is), and
``converted_config`` / the command line's written config turn on Mask DINO's side
(``maskdino_conventions``): ``TWO_STAGE_INVALID_TOKENS zero`` (tokens whose anchor leaves
(0.01, 0.99), and padding, stay selectable with zeroed features, boxes at 1),
``MASK_BOX_CONVENTION pixel_index`` (Mask DINO's "mask2box"; ``--box-init bitmask`` gives
``unit_square``, ``no`` turns the initialisation off), and ``TWO_STAGE_ANCHOR_SIZES``
(Mask DINO's anchor sizes: its "low2high" checkpoints give the stride-8 level 0.4 and the
stride-64 level 0.05, in their reversed decoder order). Checked once against Mask DINO's
own code (R50 ``3s_dowsample1_2048`` config with a one-class head, random perturbed weights,
all 9 decoder layers kept, 256 and 512 px): the same top-300 tokens, in the same order up to
ties between identical zeroed tokens, and final boxes within 4e-7.

Differences that remain, so fine-tune after converting:
* the class head: one linear objectness logit cannot express "max over 80 classes", which
  drives Mask DINO's two-stage top-k (exact only for a one-class Mask DINO);
* dropped levels and decoder layers change what the kept ones see (the deformable
  attention's softmax renormalises over fewer levels; ``--decoder-layers`` with
  ``MODEL.IMAGE_ENCODER.DEC_LAYERS 9`` keeps all nine);
* an empty two-stage mask: Mask DINO's "mask2box" turns it into a degenerate box (zero
  size at the canvas corner; "bitmask": an all-zero box), unip-v2 keeps that query's
  two-stage box;
* what Mask DINO trains with (80-class losses, label noise in denoising, its panoptic and
  semantic heads) is not converted: unip-v2 trains its own class-agnostic objective.
"""
import logging
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model

from ..config import add_unip_v2_config
from ..modeling.backbone.pretrained import convert_backbone_weights, read_weights_file
from ..modeling.image_encoder import ImageEncoder

__all__ = [
    "BOX_INIT_CONVENTIONS", "LevelMap", "SourceLevels", "align_levels", "build_target_model",
    "convert_maskdino", "converted_config", "detect_source_levels", "format_report",
    "load_maskdino_checkpoint", "maskdino_conventions", "save_converted", "select_levels",
    "target_config",
]

logger = logging.getLogger(__name__)

BACKBONE = "backbone."
PIXEL = "sem_seg_head.pixel_decoder."
PRED = "sem_seg_head.predictor."
# Present in every Mask DINO instance/panoptic checkpoint; a file without them is
# something else and converting it would only produce a wall of "missing" keys.
_REQUIRED = (PIXEL + "transformer.level_embed", PIXEL + "input_proj.0.0.weight",
             PRED + "class_embed.weight", PRED + "enc_output.weight")
# Mask DINO's MSDeformAttn layers always sample 4 points (a constructor default its
# configs never change); the head count is read off the tensors.
_MASKDINO_POINTS = 4
# Both models size the two-stage anchor of decoder-order level l as 0.05 * 2**l.
_ANCHOR_BASE = 0.05
# unip-v2 modules Mask DINO has no counterpart for: kept as the fresh model built them.
_NEW_MODULES = {
    "proposal_decoder.query_embed.": "learned query embedding added to the selected "
                                     "features; zero-initialised, so the content equals "
                                     "Mask DINO's",
    "region_proposals.": "general region proposals (Eq. 9) are new in unip-v2",
    "global_tokens.": "global tokens (Eq. 3) are new in unip-v2",
}
# Mask DINO's per-level MSDeformAttn tensors and how their rows are laid out.
_LEVEL_TENSORS = {"sampling_offsets": 2, "attention_weights": 1}  # trailing per-point dims
# Mask DINO's shared modules appear under several names (one tensor each in memory).
_ALIASES = ((re.compile(r"^decoder\.norm\.(.+)$"), r"decoder_norm.\1"),
            (re.compile(r"^(?:decoder\.)?bbox_embed\.\d+\.(.+)$"), r"_bbox_embed.\1"))


# ---------------------------------------------------------------- levels

@dataclass
class SourceLevels:
    """Mask DINO's feature levels, ranked fine (0) to coarse.

    num_backbone levels come from backbone maps through 1x1 input projections, num_extra
    from the chain of stride-2 3x3 convs on the coarsest map. proj_rank[j] is the rank of
    ``input_proj.{j}``, encoder_rank[l] the rank of the encoder's level l; the decoder
    reads the levels in the reverse of the encoder's order.
    """
    order: str
    num_backbone: int
    num_extra: int
    proj_rank: List[int]
    encoder_rank: List[int]
    channels: List[int]  # in-channels of the 1x1 projections, by rank

    @property
    def num_levels(self) -> int:
        return self.num_backbone + self.num_extra

    @property
    def decoder_rank(self) -> List[int]:
        return self.encoder_rank[::-1]


def detect_source_levels(sd: Dict[str, torch.Tensor], feature_order: str = "auto") -> SourceLevels:
    """Read Mask DINO's level layout off its input projections and level embedding.

    Mask DINO builds its 1x1 projections in the order of FEATURE_ORDER's backbone maps:
    res3, res4, res5 for "low2high" (encoder order s8, s16, s32, then the extra levels
    coarsest first), res5, res4, res3 for "high2low" (encoder order coarse to fine). The
    backbone's channels grow with depth, so the in-channels tell the two apart.
    """
    index = sorted(int(m.group(1)) for k in sd
                   if (m := re.match(rf"^{re.escape(PIXEL)}input_proj\.(\d+)\.0\.weight$", k)))
    if index != list(range(len(index))):
        raise ValueError(f"Mask DINO checkpoint: input projections {index} are not numbered "
                         f"0..{len(index) - 1}")
    kernels = [sd[f"{PIXEL}input_proj.{j}.0.weight"].shape[-1] for j in index]
    num_backbone = next((j for j, k in enumerate(kernels) if k != 1), len(kernels))
    if num_backbone == 0 or any(k != 3 for k in kernels[num_backbone:]):
        raise ValueError(f"Mask DINO checkpoint: expected 1x1 input projections followed by "
                         f"3x3 ones, got kernel sizes {kernels}")
    num_extra = len(kernels) - num_backbone
    levels = sd[PIXEL + "transformer.level_embed"].shape[0]
    if levels != len(kernels):
        raise ValueError(f"Mask DINO checkpoint: transformer.level_embed has {levels} levels "
                         f"but there are {len(kernels)} input projections")
    channels = [sd[f"{PIXEL}input_proj.{j}.0.weight"].shape[1] for j in range(num_backbone)]
    if feature_order == "auto":
        pairs = list(zip(channels[:-1], channels[1:]))
        if pairs and all(a < b for a, b in pairs):
            feature_order = "low2high"
        elif pairs and all(a > b for a, b in pairs):
            feature_order = "high2low"
        else:
            raise ValueError(f"cannot tell Mask DINO's FEATURE_ORDER from the in-channels "
                             f"{channels} of its 1x1 input projections; pass --feature-order "
                             f"low2high or high2low (SEM_SEG_HEAD.FEATURE_ORDER of its config)")
    elif feature_order not in ("low2high", "high2low"):
        raise ValueError(f"feature order must be 'auto', 'low2high' or 'high2low', got "
                         f"{feature_order!r}")
    fine_first = list(range(num_backbone))
    extras = list(range(num_backbone, num_backbone + num_extra))
    if feature_order == "low2high":
        proj_rank = fine_first + extras
        encoder_rank = fine_first + extras[::-1]
    else:
        proj_rank = fine_first[::-1] + extras
        encoder_rank = extras[::-1] + fine_first[::-1]
    by_rank = [channels[proj_rank.index(r)] for r in range(num_backbone)]
    return SourceLevels(feature_order, num_backbone, num_extra, proj_rank, encoder_rank, by_rank)


@dataclass
class LevelMap:
    """Where unip-v2's level t comes from: source rank offset + t. Names are "s{stride}"."""
    source: SourceLevels
    offset: int
    num_target: int
    source_names: List[str]  # by source rank

    def rank(self, t: int) -> int:
        return self.offset + t

    def encoder_index(self) -> List[int]:
        """For each target level, the source encoder level it takes."""
        return [self.source.encoder_rank.index(self.rank(t)) for t in range(self.num_target)]

    def decoder_index(self) -> List[int]:
        """For each target level, the source decoder (cross-attention) level it takes."""
        return [self.source.decoder_rank.index(self.rank(t)) for t in range(self.num_target)]

    def dropped_ranks(self) -> List[int]:
        kept = {self.rank(t) for t in range(self.num_target)}
        return [r for r in range(self.source.num_levels) if r not in kept]


def align_levels(source: SourceLevels, image_encoder: ImageEncoder) -> LevelMap:
    """Match Mask DINO's levels to the target's by the backbone channels they read.

    The target's levels from backbone maps must be Mask DINO's coarsest ones (Mask DINO
    may read finer maps too, e.g. res2 in the "4s" configs), and Mask DINO must have at
    least as many extra levels, built the same way from the same coarsest map.
    """
    pe = image_encoder.pixel_encoder
    shapes = image_encoder.backbone.output_shape()
    t_channels = [shapes[f].channels for f in pe.level_features]
    t_backbone, t_levels = len(pe.level_features), pe.num_levels
    offset = source.num_backbone - t_backbone
    if offset < 0 or source.channels[offset:] != t_channels:
        raise ValueError(
            f"Mask DINO's encoder reads backbone maps of {source.channels} channels (fine to "
            f"coarse, {source.order}); the target's reads {t_channels} "
            f"({pe.level_features}): does --config-file describe the checkpoint's backbone?")
    if source.num_extra < t_levels - t_backbone:
        raise ValueError(
            f"the target has {t_levels - t_backbone} extra (stride-2 conv) levels, the Mask "
            f"DINO checkpoint {source.num_extra}: its levels cannot fill "
            f"MODEL.IMAGE_ENCODER.NUM_FEATURE_LEVELS={t_levels}")
    first_stride = shapes[pe.level_features[0]].stride
    names = [f"s{int(first_stride * 2.0 ** (r - offset))}" for r in range(source.num_levels)]
    return LevelMap(source, offset, t_levels, names)


def select_levels(tensor: torch.Tensor, levels: int, index: Sequence[int],
                  per_point: int, points: int = _MASKDINO_POINTS) -> Tuple[torch.Tensor, int]:
    """Reorder/select the level blocks of an MSDeformAttn projection.

    tensor: weight (heads * levels * points * per_point, d) or bias (heads * ...): the
    rows are laid out (heads, levels, points, per_point), per_point being the (x, y) of
    sampling_offsets or 1 for attention_weights. Returns (rows of the levels in `index`,
    in that order; the number of heads).
    """
    rows = tensor.shape[0]
    block = levels * points * per_point
    if rows % block:
        raise ValueError(f"MSDeformAttn tensor of shape {tuple(tensor.shape)} is not "
                         f"(heads * {levels} levels * {points} points * {per_point}, ...)")
    heads = rows // block
    view = tensor.reshape(heads, levels, points * per_point, *tensor.shape[1:])
    picked = view[:, list(index)]
    return picked.reshape(heads * len(index) * points * per_point, *tensor.shape[1:]), heads


# ---------------------------------------------------------------- conversion

class _Conversion:
    """Book-keeping of one conversion: converted tensors by target key (relative to the
    image encoder), where each came from, and what happened to every source key."""

    def __init__(self, sd: Dict[str, torch.Tensor]):
        self.sd = sd
        self.out: Dict[str, torch.Tensor] = {}
        self.mapped: Dict[str, str] = {}
        self.used: set = set()
        self.dropped: Dict[str, str] = {}
        self.notes: List[str] = []
        self.warnings: List[str] = []

    def get(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise ValueError(f"the Mask DINO checkpoint has no {key!r} (a truncated file, or "
                             f"another Mask DINO variant than this converter knows?)")
        self.used.add(key)
        return self.sd[key]

    def put(self, target: str, value: torch.Tensor, origin: str) -> None:
        self.out[target] = value
        self.mapped[target] = origin

    def take(self, key: str, target: str) -> None:
        self.put(target, self.get(key), key)

    def drop(self, key: str, reason: str) -> None:
        self.dropped[key] = reason

    def warn(self, message: str) -> None:
        logger.warning(message)
        self.warnings.append(message)


def _check_is_maskdino(sd: Dict[str, torch.Tensor]) -> None:
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        raise ValueError(
            f"this is not a Mask DINO checkpoint: it has no {missing} (it has {len(sd)} "
            f"tensors, e.g. {sorted(sd)[:5]}); expected detectron2 Mask DINO names "
            f"('{BACKBONE}*', '{PIXEL}*', '{PRED}*')")


def _dealias(conv: _Conversion) -> None:
    """Replace the aliases of Mask DINO's shared modules by one canonical key each."""
    groups: Dict[str, List[str]] = {}
    for key in conv.sd:
        if key.startswith(PRED):
            rest = key[len(PRED):]
            for pattern, canonical in _ALIASES:
                if pattern.match(rest):
                    groups.setdefault(PRED + pattern.sub(canonical, rest), []).append(key)
    sd = dict(conv.sd)
    for canonical, aliases in groups.items():
        names = ([canonical] if canonical in conv.sd else []) + sorted(aliases)
        ref = conv.sd[names[0]]
        differ = [n for n in names[1:]
                  if conv.sd[n].shape != ref.shape or not torch.equal(conv.sd[n], ref)]
        if differ:
            conv.warn(f"{names[0]} and its aliases {differ} differ (Mask DINO shares one module "
                      f"under these names); using {names[0]}")
        sd[canonical] = ref
        for alias in aliases:
            del sd[alias]
            conv.drop(alias, f"alias of {canonical} (Mask DINO shares one module; taken once"
                             + ("; this copy differs" if alias in differ else "") + ")")
    conv.sd = sd


def _layer_indices(sd: Dict[str, torch.Tensor], prefix: str) -> List[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def _map_attention_layer(conv: _Conversion, src_prefix: str, dst_prefix: str, attn: str,
                         levels: LevelMap, index: List[int], source_rank: List[int],
                         target_attn: nn.Module, what: str) -> None:
    """Copy one encoder or decoder layer; the level blocks of its MSDeformAttn `attn` are
    taken in `index` order (source level per target level; source_rank names them)."""
    names = ",".join(levels.source_names[source_rank[i]] for i in index)
    for key in [k for k in conv.sd if k.startswith(src_prefix)]:
        rest = key[len(src_prefix):]
        m = re.match(rf"^{attn}\.({'|'.join(_LEVEL_TENSORS)})\.(weight|bias)$", rest)
        if m is None:
            conv.take(key, dst_prefix + rest)
            continue
        value, heads = select_levels(conv.get(key), levels.source.num_levels, index,
                                     _LEVEL_TENSORS[m.group(1)])
        if (heads, _MASKDINO_POINTS) != (target_attn.n_heads, target_attn.n_points):
            raise ValueError(
                f"{key}: Mask DINO's {what} attention has {heads} heads and "
                f"{_MASKDINO_POINTS} points, the target's {target_attn.n_heads} heads and "
                f"{target_attn.n_points} points (MODEL.IMAGE_ENCODER.NHEADS / "
                f"{what[:3].upper()}_N_POINTS)")
        conv.put(dst_prefix + rest, value, f"{key} [levels {names}]")


def _map_pixel_decoder(conv: _Conversion, levels: LevelMap, image_encoder: ImageEncoder) -> None:
    src = levels.source
    pe = image_encoder.pixel_encoder
    used_proj = set()
    for t in range(levels.num_target):
        rank = levels.rank(t)
        j = src.proj_rank.index(rank)
        used_proj.add(j)
        for suffix in ("0.weight", "0.bias", "1.weight", "1.bias"):
            conv.take(f"{PIXEL}input_proj.{j}.{suffix}", f"pixel_encoder.input_proj.{t}.{suffix}")
    for j in range(src.num_levels):
        if j not in used_proj:
            for key in [k for k in conv.sd if k.startswith(f"{PIXEL}input_proj.{j}.")]:
                conv.drop(key, f"input projection of level {levels.source_names[src.proj_rank[j]]},"
                               f" which unip-v2's encoder does not have")

    enc_index = levels.encoder_index()
    key = PIXEL + "transformer.level_embed"
    conv.put("pixel_encoder.level_embed", conv.get(key)[enc_index],
             f"{key} [rows {enc_index}]")

    layers_prefix = PIXEL + "transformer.encoder.layers."
    target_layers = pe.encoder.layers
    for i in _layer_indices(conv.sd, layers_prefix):
        src_prefix = f"{layers_prefix}{i}."
        if i >= len(target_layers):
            for k in [k for k in conv.sd if k.startswith(src_prefix)]:
                conv.drop(k, f"encoder layer {i}: the target has "
                             f"MODEL.IMAGE_ENCODER.ENC_LAYERS={len(target_layers)}")
            continue
        _map_attention_layer(conv, src_prefix, f"pixel_encoder.encoder.layers.{i}.",
                             "self_attn", levels, enc_index, src.encoder_rank,
                             target_layers[i].self_attn, "encoder")

    for k in [k for k in conv.sd if k.startswith(PIXEL)]:
        rest = k[len(PIXEL):]
        if rest.startswith(("adapter_1.", "layer_1.", "mask_features.")):
            conv.take(k, "pixel_encoder." + rest)


def _map_class_head(conv: _Conversion, class_head: str) -> None:
    keys = [PRED + "class_embed.weight", PRED + "class_embed.bias", PRED + "label_enc.weight"]
    if class_head == "fresh":
        for k in keys:
            if k in conv.sd:
                conv.drop(k, "class head re-initialised (--class-head fresh)")
        return
    weight, bias, label = (conv.get(k) for k in keys)
    n = weight.shape[0]
    conv.put("proposal_decoder.class_embed.weight", weight.float().mean(0, keepdim=True),
             f"{keys[0]} [mean of {n} rows]")
    conv.put("proposal_decoder.class_embed.bias", bias.float().logsumexp(0, keepdim=True),
             f"{keys[1]} [logsumexp of {n}]")
    conv.put("proposal_decoder.label_enc.weight", label.float().mean(0, keepdim=True),
             f"{keys[2]} [mean of {label.shape[0]} rows]")
    conv.notes.append(
        f"class head: {n} class logits -> 1 objectness logit (weight: mean of the rows, bias: "
        f"logsumexp), label_enc: mean of its rows. Approximate (a linear layer cannot take "
        f"the max over classes that drives the two-stage top-k): fine-tune.")


def _parse_decoder_layers(decoder_layers, num_source: int, num_target: int) -> List[int]:
    if decoder_layers is None:
        if num_target > num_source:
            raise ValueError(f"the target has MODEL.IMAGE_ENCODER.DEC_LAYERS={num_target}, the "
                             f"Mask DINO checkpoint only {num_source} decoder layers")
        chosen = list(range(num_target))
    elif isinstance(decoder_layers, str):
        try:
            chosen = [int(x) for x in decoder_layers.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--decoder-layers must be comma-separated integers, got "
                             f"{decoder_layers!r}") from None
    else:
        chosen = [int(x) for x in decoder_layers]
    if len(chosen) != num_target:
        raise ValueError(f"--decoder-layers names {len(chosen)} layers {chosen}; the target has "
                         f"MODEL.IMAGE_ENCODER.DEC_LAYERS={num_target}")
    bad = [i for i in chosen if not 0 <= i < num_source]
    if bad or len(set(chosen)) != len(chosen):
        raise ValueError(f"--decoder-layers {chosen}: each must be a distinct layer of the Mask "
                         f"DINO decoder, 0..{num_source - 1}")
    return chosen


def _map_predictor(conv: _Conversion, levels: LevelMap, image_encoder: ImageEncoder,
                   decoder_layers, class_head: str) -> List[int]:
    for k in [k for k in conv.sd if k.startswith(PRED)]:
        rest = k[len(PRED):]
        if rest.startswith(("enc_output.", "enc_output_norm.", "mask_embed.", "decoder_norm.",
                            "_bbox_embed.", "decoder.ref_point_head.")):
            conv.take(k, "proposal_decoder." + rest)
    _map_class_head(conv, class_head)

    layers_prefix = PRED + "decoder.layers."
    source_layers = _layer_indices(conv.sd, layers_prefix)
    if source_layers != list(range(len(source_layers))) or not source_layers:
        raise ValueError(f"Mask DINO checkpoint: decoder layers {source_layers} are not "
                         f"numbered 0..n-1")
    target_layers = image_encoder.proposal_decoder.decoder.layers
    chosen = _parse_decoder_layers(decoder_layers, len(source_layers), len(target_layers))
    dec_index = levels.decoder_index()
    for t, s in enumerate(chosen):
        _map_attention_layer(conv, f"{layers_prefix}{s}.", f"proposal_decoder.decoder.layers.{t}.",
                             "cross_attn", levels, dec_index, levels.source.decoder_rank,
                             target_layers[t].cross_attn, "decoder")
    for s in source_layers:
        if s not in chosen:
            for k in [k for k in conv.sd if k.startswith(f"{layers_prefix}{s}.")]:
                conv.drop(k, f"decoder layer {s} not kept (--decoder-layers {chosen})")
    return chosen


def _map_backbone(conv: _Conversion, image_encoder: ImageEncoder) -> str:
    """Backbone keys through unip_v2's ImageNet-weights loader (same name layouts)."""
    file_keys = [k for k in conv.sd if k.startswith(BACKBONE)]
    weights = {k[len(BACKBONE):]: conv.sd[k] for k in file_keys}
    converted, report, layout = convert_backbone_weights(image_encoder.backbone, weights)
    name = type(image_encoder.backbone).__name__
    problems = []
    if report["missing"]:
        problems.append(f"{len(report['missing'])} target tensors have no source, e.g. "
                        f"{report['missing'][:3]}")
    if report["shape_mismatch"]:
        problems.append(f"{len(report['shape_mismatch'])} differ in shape, e.g. "
                        f"{report['shape_mismatch'][:3]}")
    if report["unexpected"]:
        problems.append(f"{len(report['unexpected'])} source tensors have no place, e.g. "
                        f"{report['unexpected'][:3]}")
    if problems:
        raise ValueError(f"the checkpoint's backbone ({layout} layout, {len(weights)} tensors) "
                         f"does not fit the target's {name}: " + "; ".join(problems)
                         + ". Does --config-file describe the checkpoint's backbone "
                         "(MODEL.BACKBONE.NAME, RESNETS.DEPTH, SWIN.*)?")
    for key, value in converted.items():
        conv.put("backbone." + key, value, f"{BACKBONE}{key} ({layout} layout)")
    ignored = set(report["ignored"])
    for k in report["ignored"]:
        conv.drop(BACKBONE + k, "backbone tensor the target does not keep (buffer it "
                                "rebuilds, classifier or final norm)")
    conv.used.update(k for k in file_keys if k[len(BACKBONE):] not in ignored)
    conv.notes.extend(f"backbone: {note}" for note in report["interpolated"])
    return layout


def _fresh_reason(key: str, class_head: str) -> Optional[str]:
    """Why a target key (relative to the image encoder) may keep its fresh value."""
    for prefix, reason in _NEW_MODULES.items():
        if key.startswith(prefix):
            return reason
    if key.endswith("num_batches_tracked"):
        return "BatchNorm step counter (Mask DINO's backbone uses FrozenBN, which has none)"
    if class_head == "fresh" and key.startswith(("proposal_decoder.class_embed.",
                                                 "proposal_decoder.label_enc.")):
        return "class head re-initialised (--class-head fresh)"
    return None


def _image_encoder_of(model: nn.Module) -> Tuple[str, ImageEncoder]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, ImageEncoder)]
    if len(found) != 1:
        raise ValueError(f"the target model ({type(model).__name__}) must contain exactly one "
                         f"ImageEncoder, found {len(found)}")
    name, module = found[0]
    return (name + "." if name else ""), module


def _level_notes(conv: _Conversion, levels: LevelMap, chosen: List[int],
                 num_source: int) -> List[float]:
    """Notes on levels, anchors and decoder layers; returns Mask DINO's two-stage anchor
    sizes of unip-v2's levels, fine to coarse."""
    src = levels.source
    names = levels.source_names
    conv.notes.append(
        f"levels: Mask DINO ({src.order}) encoder "
        f"{','.join(names[r] for r in src.encoder_rank)}, decoder "
        f"{','.join(names[r] for r in src.decoder_rank)}; unip-v2 "
        f"{','.join(names[levels.rank(t)] for t in range(levels.num_target))} in both "
        f"(permuted: input_proj, level_embed, sampling_offsets, attention_weights)")
    dropped = levels.dropped_ranks()
    if dropped:
        conv.notes.append(
            f"level(s) {','.join(names[r] for r in dropped)} dropped everywhere (input "
            f"projection, level_embed row, their blocks of every MSDeformAttn); the attention "
            f"softmax now spreads over {levels.num_target} levels: fine-tune.")
        if levels.offset > 0:
            conv.notes.append(
                f"mask map: Mask DINO added res2 to its upsampled {names[0]} encoder output, "
                f"unip-v2 adds it to the {names[levels.offset]} output.")
    src_sizes = {r: _ANCHOR_BASE * 2 ** src.decoder_rank.index(r)
                 for r in range(src.num_levels)}
    tgt_sizes = {levels.rank(t): _ANCHOR_BASE * 2 ** t for t in range(levels.num_target)}

    def fmt(sizes):
        return ", ".join(f"{names[r]} {s:g}" for r, s in sorted(sizes.items()))

    if any(abs(src_sizes[r] - s) > 1e-12 for r, s in tgt_sizes.items()):
        conv.notes.append(
            f"two-stage anchors differ from unip-v2's default sizes (they are not weights): "
            f"Mask DINO used {fmt(src_sizes)}; unip-v2's default is {fmt(tgt_sizes)}. The "
            f"config written with the checkpoint sets MODEL.IMAGE_ENCODER."
            f"TWO_STAGE_ANCHOR_SIZES to Mask DINO's.")
    else:
        conv.notes.append(f"two-stage anchors: the same as Mask DINO's ({fmt(tgt_sizes)}).")
    if len(chosen) != num_source or chosen != list(range(num_source)):
        conv.notes.append(f"decoder: kept Mask DINO layers {chosen} of 0..{num_source - 1}.")
    return [src_sizes[levels.rank(t)] for t in range(levels.num_target)]


def convert_maskdino(source: Dict[str, torch.Tensor], model: nn.Module, *,
                     decoder_layers=None, class_head: str = "mean",
                     feature_order: str = "auto") -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Map a Mask DINO state dict onto `model` (a unip-v2 model built on CPU).

    Args:
        source: Mask DINO's state dict (detectron2 names; `read_weights_file` output).
        model: the target, e.g. ``build_model(cfg)``; only its keys, shapes and fresh
            values are read.
        decoder_layers: Mask DINO decoder layers to keep, a list or "0,1,..." (default the
            first DEC_LAYERS).
        class_head: "mean" or "fresh" (module docstring).
        feature_order: "auto", "low2high" or "high2low".
    Returns:
        (state dict with every key of `model`, its tensors possibly shared with `source`
        and `model`; report dict: "mapped" {target key: origin},
        "dropped" {source key: reason}, "initialised" {target key: reason}, "notes",
        "warnings", "source", "target").
    Raises:
        ValueError with the reason when the source is not a Mask DINO checkpoint or does not
        fit the model (backbone, widths, levels, heads, depths).
    """
    if class_head not in ("mean", "fresh"):
        raise ValueError(f"class_head must be 'mean' or 'fresh', got {class_head!r}")
    _check_is_maskdino(source)
    prefix, image_encoder = _image_encoder_of(model)
    conv = _Conversion(dict(source))
    for k in [k for k in conv.sd if k.startswith("criterion.")]:
        conv.drop(k, "buffer of Mask DINO's loss (class weights of its criterion)")
    _dealias(conv)

    levels = align_levels(detect_source_levels(conv.sd, feature_order), image_encoder)
    layout = _map_backbone(conv, image_encoder)
    _map_pixel_decoder(conv, levels, image_encoder)
    num_source_dec = len(_layer_indices(conv.sd, PRED + "decoder.layers."))
    chosen = _map_predictor(conv, levels, image_encoder, decoder_layers, class_head)

    for k in conv.sd:
        if k not in conv.used and k not in conv.dropped:
            conv.drop(k, "no counterpart in unip-v2 (not a Mask DINO key this converter maps)")
            conv.warn(f"dropped {k}: no counterpart in unip-v2")

    target = model.state_dict()
    state, initialised, missing, mismatched = {}, {}, [], []
    for key, fresh in target.items():
        rel = key[len(prefix):] if key.startswith(prefix) else None
        if rel is not None and rel in conv.out:
            value = conv.out[rel]
            if tuple(value.shape) != tuple(fresh.shape):
                mismatched.append(f"{conv.mapped[rel]} -> {key}: {tuple(value.shape)} vs "
                                  f"{tuple(fresh.shape)}")
                continue
            # no copy: the tensors are written out once; a fresh copy of ~50M parameters
            # would double the converter's memory and time for nothing
            state[key] = value.detach().to(dtype=fresh.dtype).contiguous()
            continue
        reason = ("outside the image encoder" if rel is None
                  else _fresh_reason(rel, class_head))
        if reason is None:
            missing.append(key)
            continue
        initialised[key] = reason
        state[key] = fresh.detach()
    unknown = sorted(prefix + k for k in conv.out if prefix + k not in target)
    if mismatched or missing or unknown:
        parts = []
        for title, items in (("shape mismatches", mismatched),
                             ("model keys the checkpoint does not fill", missing),
                             ("converted keys the model lacks", unknown)):
            if items:
                parts.append(f"{len(items)} {title}, e.g.\n  " + "\n  ".join(items[:8]))
        raise ValueError("the Mask DINO checkpoint does not fit the target model:\n"
                         + "\n".join(parts) + "\nDoes --config-file describe the checkpoint's "
                         "model (backbone, HIDDEN_DIM, DIM_FEEDFORWARD, MASK_DIM, ENC_LAYERS, "
                         "NUM_FEATURE_LEVELS)?")

    anchor_sizes = _level_notes(conv, levels, chosen, num_source_dec)
    src = levels.source
    report = {
        "source": {"keys": len(source), "backbone_layout": layout, "feature_order": src.order,
                   "levels": levels.source_names,
                   "encoder_levels": [levels.source_names[r] for r in src.encoder_rank],
                   "decoder_levels": [levels.source_names[r] for r in src.decoder_rank],
                   "decoder_layers": num_source_dec},
        "target": {"model": type(model).__name__, "keys": len(target),
                   "levels": [levels.source_names[levels.rank(t)]
                              for t in range(levels.num_target)],
                   "decoder_layers_from": chosen, "class_head": class_head,
                   "maskdino_anchor_sizes": anchor_sizes},
        "mapped": {prefix + k: v for k, v in conv.mapped.items()},
        "dropped": dict(sorted(conv.dropped.items())),
        "initialised": initialised,
        "notes": conv.notes,
        "warnings": conv.warnings,
    }
    return state, report


# ---------------------------------------------------------------- files

def load_maskdino_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """{name: tensor} of a Mask DINO .pth/.pkl (``{"model": ...}`` unwrapped, numpy arrays
    of detectron2 .pkl files turned into tensors)."""
    return read_weights_file(path)


def save_converted(state: Dict[str, torch.Tensor], path: str, source_path: str) -> None:
    """Write detectron2's checkpoint format; exact names, so no matching heuristics."""
    if not path.endswith(".pth"):
        raise ValueError(f"--output must be a .pth file (what DetectionCheckpointer reads as "
                         f"a native checkpoint), got {path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"model": state, "__author__": f"unip_v2.checkpoint.maskdino from "
                f"{os.path.basename(source_path)}", "matching_heuristics": False}, path)


# Mask DINO's MODEL.MaskDINO.INITIALIZE_BOX_TYPE (how its checkpoint was trained to start
# the decoder's boxes) -> the unip-v2 keys that compute the same initial boxes.
BOX_INIT_CONVENTIONS = {
    "mask2box": {"INITIALIZE_BOX_TYPE": "mask2box", "MASK_BOX_CONVENTION": "pixel_index"},
    "bitmask": {"INITIALIZE_BOX_TYPE": "mask2box", "MASK_BOX_CONVENTION": "unit_square"},
    "no": {"INITIALIZE_BOX_TYPE": "none"},
}


def maskdino_conventions(box_init: str = "mask2box",
                         anchor_sizes: Optional[Sequence[float]] = None) -> List:
    """Config overrides (KEY VALUE ...) under which a converted checkpoint's proposal path
    computes what Mask DINO's does: tokens without a valid anchor stay selectable with
    zeroed features (TWO_STAGE_INVALID_TOKENS "zero"), the initial decoder boxes follow
    `box_init`, the INITIALIZE_BOX_TYPE of the checkpoint's Mask DINO config, and the
    two-stage anchors have Mask DINO's sizes (`anchor_sizes`, the report's
    ``target.maskdino_anchor_sizes``; None keeps the config's). unip-v2's defaults differ
    on purpose; ``ProposalDecoder`` says why."""
    if box_init not in BOX_INIT_CONVENTIONS:
        raise ValueError(f"box_init must be one of {sorted(BOX_INIT_CONVENTIONS)} (Mask DINO's "
                         f"MODEL.MaskDINO.INITIALIZE_BOX_TYPE), got {box_init!r}")
    opts = ["MODEL.IMAGE_ENCODER.TWO_STAGE_INVALID_TOKENS", "zero"]
    for key, value in BOX_INIT_CONVENTIONS[box_init].items():
        opts += [f"MODEL.IMAGE_ENCODER.{key}", value]
    if anchor_sizes is not None:
        opts += ["MODEL.IMAGE_ENCODER.TWO_STAGE_ANCHOR_SIZES", [float(a) for a in anchor_sizes]]
    return opts


def target_config(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """unip-v2's config of the target model: `config_file` + `opts`."""
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def converted_config(config_file: str, opts: Sequence[str], weights: str,
                     box_init: str = "mask2box",
                     anchor_sizes: Optional[Sequence[float]] = None) -> CfgNode:
    """The config to evaluate or fine-tune a converted checkpoint with: the target config,
    `opts`, MODEL.WEIGHTS = `weights`, Mask DINO's conventions (`maskdino_conventions`) and
    no separate backbone weights (the checkpoint holds the backbone)."""
    cfg = target_config(config_file, list(opts) + maskdino_conventions(box_init, anchor_sizes))
    cfg.MODEL.WEIGHTS = weights
    cfg.MODEL.BACKBONE.PRETRAINED = ""
    return cfg


def build_target_model(config_file: str, opts: Sequence[str] = (), seed: int = 0) -> nn.Module:
    """The model of `config_file` + `opts` on CPU, fresh (no ImageNet weights: the
    checkpoint's backbone replaces them anyway)."""
    cfg = target_config(config_file, opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.PRETRAINED = ""
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def format_report(report: Dict) -> str:
    src, tgt = report["source"], report["target"]
    lines = [
        f"Mask DINO checkpoint: {src['keys']} keys, backbone {src['backbone_layout']} layout, "
        f"FEATURE_ORDER {src['feature_order']}, {src['decoder_layers']} decoder layers",
        f"target {tgt['model']}: {tgt['keys']} keys; {len(report['mapped'])} converted, "
        f"{len(report['initialised'])} initialised; {len(report['dropped'])} source keys dropped",
        f"dropped ({len(report['dropped'])}):",
    ]
    lines += [f"  {k}: {reason}" for k, reason in report["dropped"].items()]
    lines.append(f"initialised from the fresh model ({len(report['initialised'])}):")
    lines += [f"  {k}: {reason}" for k, reason in report["initialised"].items()]
    lines.append("notes:")
    lines += [f"  - {n}" for n in report["notes"]]
    if report["warnings"]:
        lines.append("warnings:")
        lines += [f"  ! {w}" for w in report["warnings"]]
    return "\n".join(lines)
