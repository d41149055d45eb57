"""Text-only mapper of the masked language modelling task (Uni-Perceiver v2, Sec. 4.3: MLM on
plain-text corpora such as Books&Wiki; the toy_shapes captions as text).

A record is ``{"text": str}`` (optionally with an ``"id"``). The mapper only checks the text:
tokenization, truncation and masking happen in the task, batched on tensors (the fast
tokenizer encodes a whole batch in one call). A record whose text is not a string, or is empty
or blank, gives None with a warning and is counted (``num_skipped``): the train loader draws
another sample, the test loader leaves it out.
"""
import logging
from typing import Dict, Optional

from detectron2.config import configurable

__all__ = ["TextDatasetMapper"]

logger = logging.getLogger(__name__)


class TextDatasetMapper:
    """{"text": str[, "id"]} -> {"text": str (stripped of surrounding white space)[, "id"]};
    None (warned, counted in ``num_skipped``) for a missing, non-string or blank text.

    Stripping matters: RoBERTa's byte-level BPE has no prefix space, so " red" and "red" are
    different tokens, and a stray leading space would change the first word's token."""

    @configurable
    def __init__(self, is_train: bool = True):
        self.is_train = is_train
        self.num_skipped = 0

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {"is_train": is_train}

    def _skip(self, dataset_dict, why: str) -> None:
        self.num_skipped += 1
        where = f" (id {dataset_dict['id']!r})" if isinstance(dataset_dict, dict) and \
            "id" in dataset_dict else ""
        logger.warning(f"Skipping a text record{where}: {why}. {self.num_skipped} text "
                       f"record(s) skipped so far by this mapper.")

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        if not isinstance(dataset_dict, dict):
            self._skip(dataset_dict, f"the record is a {type(dataset_dict).__name__}, not a "
                                     "dict with a 'text'")
            return None
        text = dataset_dict.get("text")
        if not isinstance(text, str):
            self._skip(dataset_dict, f"'text' must be a string, got "
                                     f"{type(text).__name__} {text!r:.80}")
            return None
        text = text.strip()
        if not text:
            self._skip(dataset_dict, "'text' is empty or blank")
            return None
        out = {"text": text}
        if "id" in dataset_dict:
            out["id"] = dataset_dict["id"]
        return out
