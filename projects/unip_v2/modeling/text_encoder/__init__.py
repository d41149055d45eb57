"""f_text (Eq. 4): RoBERTa's byte-level BPE tokenizer and RoBERTa token features."""
from .text_encoder import TextEncoder, build_roberta
from .tokenizer import (
    ROBERTA_SPECIAL_TOKENS,
    TOKENIZER_FILES,
    build_tokenizer,
    train_byte_level_bpe,
)

__all__ = ["ROBERTA_SPECIAL_TOKENS", "TOKENIZER_FILES", "TextEncoder", "build_roberta",
           "build_tokenizer", "train_byte_level_bpe"]
