"""g: the unified decoder ([<SPE>, segments...] -> representations) and its conditional
MoE FFN with attribute-level routing."""
from .attributes import ATTRIBUTE_DIM, AttributeBit, SegmentKind, sequence_attributes
from .moe import AttributeGate, ConditionalMoEFFN
from .unified_decoder import DecoderCache, DecoderOutput, Segment, UnifiedDecoder

__all__ = [
    "ATTRIBUTE_DIM", "AttributeBit", "AttributeGate", "ConditionalMoEFFN", "DecoderCache",
    "DecoderOutput",
    "Segment", "SegmentKind", "UnifiedDecoder", "sequence_attributes",
]
