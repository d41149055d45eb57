"""Routing attribute vectors of the conditional MoE (Uni-Perceiver-MoE's attribute-level
routing, used by Uni-Perceiver v2, Sec. 4.3).

The gate of every MoE FFN sees a fixed binary vector per segment, never token content.
Uni-Perceiver-MoE used 8 bits (modality present in the task, this segment's modality,
target or not, causal text); v2 splits images into global and regional tokens, so the
table below keeps 8 bits but spends them on v2's three segment kinds.

Attribute table (ATTRIBUTE_DIM = 8, bit order b0..b7):

    bit  name                   set when
    ---  ---------------------  ---------------------------------------------------------
    b0   SEG_IMAGE_GLOBAL       this segment is image-global tokens (attention pools + F3)
    b1   SEG_IMAGE_REGION       this segment is image-regional tokens (top-O proposals)
    b2   SEG_TEXT               this segment is text tokens (RoBERTa features)
    b3   SEQ_HAS_IMAGE_GLOBAL   the sequence holds an image-global segment
    b4   SEQ_HAS_IMAGE_REGION   the sequence holds an image-regional segment
    b5   SEQ_HAS_TEXT           the sequence holds a text segment
    b6   TARGET                 the sequence is a target (class name, retrieval caption,
                                vocabulary word), 0 for an input
    b7   CAUSAL_TEXT            this segment is causal (auto-regressive caption) text

The <SPE> token is its own routing segment: b0-b2 and b7 are 0, the sequence bits b3-b6
are those of its sequence. So <SPE> of an image input and <SPE> of a class-name target
route differently, and a segment's routing never depends on the other segments' lengths.

Examples (rows as b0..b7):
    image input [SPE, global, region]:  SPE 00011000, global 10011000, region 01011000
    class-name target [SPE, text]:      SPE 00000110, text 00100110
    caption input [SPE, global, region, words]: words 00111101
"""
from enum import IntEnum
from typing import List, Sequence, Tuple

import torch

__all__ = ["ATTRIBUTE_DIM", "AttributeBit", "SegmentKind", "attribute_rows",
           "sequence_attributes"]


class SegmentKind(IntEnum):
    """Kinds of token segments; the value is also the row of the decoder's
    segment-type embedding table (<SPE> has no type embedding)."""

    IMAGE_GLOBAL = 0
    IMAGE_REGION = 1
    TEXT = 2


class AttributeBit(IntEnum):
    """Index of each bit of the routing attribute vector (see the module docstring)."""

    SEG_IMAGE_GLOBAL = 0
    SEG_IMAGE_REGION = 1
    SEG_TEXT = 2
    SEQ_HAS_IMAGE_GLOBAL = 3
    SEQ_HAS_IMAGE_REGION = 4
    SEQ_HAS_TEXT = 5
    TARGET = 6
    CAUSAL_TEXT = 7


ATTRIBUTE_DIM = len(AttributeBit)

# Segment kind -> (its own-segment bit, its sequence-presence bit).
_KIND_BITS = {
    SegmentKind.IMAGE_GLOBAL: (AttributeBit.SEG_IMAGE_GLOBAL, AttributeBit.SEQ_HAS_IMAGE_GLOBAL),
    SegmentKind.IMAGE_REGION: (AttributeBit.SEG_IMAGE_REGION, AttributeBit.SEQ_HAS_IMAGE_REGION),
    SegmentKind.TEXT: (AttributeBit.SEG_TEXT, AttributeBit.SEQ_HAS_TEXT),
}


def attribute_rows(
    kinds: Sequence[SegmentKind],
    causal: Sequence[bool],
    is_target: bool,
) -> List[Tuple[float, ...]]:
    """Attribute rows of one sequence [<SPE>, segment_0, ..., segment_{n-1}], as Python
    tuples: the decoder plans its MoE routing from them on the host, without reading a
    tensor back from the device.

    Args:
        kinds: n segment kinds, in sequence order (n >= 1).
        causal: n flags; True marks causal text (only allowed for TEXT segments).
        is_target: whether the sequence encodes a target rather than an input.
    Returns:
        1 + n tuples of ATTRIBUTE_DIM floats 0.0 / 1.0; row 0 is <SPE>, row i+1 segment i.
    """
    if len(kinds) == 0:
        raise ValueError("a sequence needs at least one segment besides <SPE>")
    if len(causal) != len(kinds):
        raise ValueError(f"got {len(kinds)} segment kinds but {len(causal)} causal flags")
    kinds = [SegmentKind(k) for k in kinds]
    for kind, is_causal in zip(kinds, causal):
        if is_causal and kind != SegmentKind.TEXT:
            raise ValueError(f"only TEXT segments can be causal, got causal {kind.name}")

    # Sequence-level bits are shared by every row, <SPE> included.
    shared = [0.0] * ATTRIBUTE_DIM
    for kind in kinds:
        shared[_KIND_BITS[kind][1]] = 1.0
    shared[AttributeBit.TARGET] = float(is_target)
    rows = [tuple(shared)]
    for kind, is_causal in zip(kinds, causal):
        row = list(shared)
        row[_KIND_BITS[kind][0]] = 1.0
        row[AttributeBit.CAUSAL_TEXT] = float(is_causal)
        rows.append(tuple(row))
    return rows


def sequence_attributes(
    kinds: Sequence[SegmentKind],
    causal: Sequence[bool],
    is_target: bool,
    device=None,
) -> torch.Tensor:
    """attribute_rows as a float tensor (1 + n, ATTRIBUTE_DIM) of 0/1 on `device`."""
    return torch.tensor(attribute_rows(kinds, causal, is_target), dtype=torch.float32,
                        device=device)
