"""A tiny generated toy_shapes and its BPE tokenizer, for tests that train or evaluate the toy
model (a fresh clone has neither)."""
import os

import unip_v2  # noqa: F401  (first: makes detectron2 importable)

from unip_v2.data.datasets import ensure_toy_shapes
from unip_v2.data.datasets.toy_tokenizer import ensure_toy_tokenizer


def make_toy_data(tmp_path_factory, num_train: int, num_val: int, num_novel: int = 1):
    """(datasets folder for $DETECTRON2_DATASETS, the toy_shapes root, the tokenizer path)."""
    datasets = str(tmp_path_factory.mktemp("datasets"))
    root = os.path.join(datasets, "toy_shapes")
    ensure_toy_shapes(root, num_train=num_train, num_val=num_val, num_novel=num_novel, seed=0)
    return datasets, root, ensure_toy_tokenizer(root, vocab_size=300)["path"]
