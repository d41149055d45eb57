"""Registration of the real task datasets under ``$DETECTRON2_DATASETS`` (``./datasets`` when
unset), done when ``unip_v2.data`` is imported. Registration reads nothing: a dataset that is
not on disk fails only when loaded. Layouts and names: ``datasets/README.md``.
"""
import os
from typing import List, Optional

from .captions import register_coco_karpathy, register_flickr30k
from .imagenet import register_imagenet
from .streams import register_text_corpus, register_webdataset_pairs

__all__ = ["IMAGE_TEXT_CORPORA", "register_all_task_datasets"]

# Image-text corpora in img2dataset's WebDataset layout: $DETECTRON2_DATASETS/<dir>/*.tar.
IMAGE_TEXT_CORPORA = ("cc3m", "cc12m", "sbu", "yfcc", "vg")


def register_all_task_datasets(datasets_root: Optional[str] = None) -> List[str]:
    """Register ImageNet-1k, COCO Karpathy, Flickr30k, the image-text corpora and the
    Books&Wiki text corpus under ``datasets_root`` (default ``$DETECTRON2_DATASETS``).
    Returns the names."""
    root = datasets_root or os.getenv("DETECTRON2_DATASETS", "datasets")
    names = register_imagenet(os.path.join(root, "imagenet"))
    names += register_coco_karpathy(os.path.join(root, "coco"))
    names += register_flickr30k(os.path.join(root, "flickr30k"))
    for corpus in IMAGE_TEXT_CORPORA:
        shards = os.path.join(root, corpus, "*.tar")
        for task in ("retrieval", "captioning"):
            names.append(register_webdataset_pairs(f"{corpus}_train_{task}", shards,
                                                   task=task, shuffle=True))
    names.append(register_text_corpus("bookswiki_train_mlm",
                                      os.path.join(root, "bookswiki", "*.txt"), shuffle=True))
    return names
