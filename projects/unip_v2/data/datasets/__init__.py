"""Datasets. Importing this package registers, in detectron2's catalogs (lazily: nothing is
generated or read here):

* the toy datasets under ``$DETECTRON2_DATASETS/toy_shapes``: ``toy_shapes_{train,val,novel}``
  (detection; see ``tools/make_toy_dataset.py``) and the task views
  ``toy_shapes_{train,val}_{classification,captioning,retrieval,mlm}``;
* the real task datasets under ``$DETECTRON2_DATASETS``: ``imagenet_{train,val}``,
  ``coco_karpathy_{train,val,test}_{captioning,retrieval}``,
  ``flickr30k_{val,test}_retrieval``, ``{cc3m,cc12m,sbu,yfcc,vg}_train_{retrieval,captioning}``
  (streamed WebDataset shards) and ``bookswiki_train_mlm`` (streamed text).

Layouts and dataset-dict formats: ``datasets/README.md``.
"""
from .builtin_tasks import IMAGE_TEXT_CORPORA, register_all_task_datasets
from .captions import (
    caption_ground_truth,
    load_coco_captions_json,
    load_karpathy_json,
    register_coco_karpathy,
    register_flickr30k,
    write_caption_json,
)
from .imagenet import load_image_folder, load_image_labels_json, register_imagenet
from .metadata import thing_classes
from .streams import TextCorpus, WebDatasetPairs, register_text_corpus, register_webdataset_pairs
from .task_common import TASKS, SkipCounter, class_names, read_class_list, register_task_dataset
from .toy_shapes import (
    GENERATOR_VERSION,
    TOY_SHAPES_CATEGORIES,
    TOY_SHAPES_NOVEL_CATEGORIES,
    ensure_toy_shapes,
    generate_toy_shapes,
    load_toy_shapes_json,
    register_toy_shapes,
    toy_shapes_categories,
    toy_shapes_files,
    toy_shapes_root,
    toy_shapes_scene,
)
from .toy_shapes_render import RenderParams, ToyScene, render_toy_image
from .toy_shapes_tasks import load_toy_shapes_texts, register_toy_shapes_tasks

register_toy_shapes(toy_shapes_root())
register_toy_shapes_tasks(toy_shapes_root())
register_all_task_datasets()

__all__ = [
    "GENERATOR_VERSION",
    "IMAGE_TEXT_CORPORA",
    "TASKS",
    "TOY_SHAPES_CATEGORIES",
    "TOY_SHAPES_NOVEL_CATEGORIES",
    "RenderParams",
    "SkipCounter",
    "TextCorpus",
    "ToyScene",
    "WebDatasetPairs",
    "caption_ground_truth",
    "class_names",
    "ensure_toy_shapes",
    "generate_toy_shapes",
    "load_coco_captions_json",
    "load_image_folder",
    "load_image_labels_json",
    "load_karpathy_json",
    "load_toy_shapes_json",
    "load_toy_shapes_texts",
    "read_class_list",
    "register_all_task_datasets",
    "register_coco_karpathy",
    "register_flickr30k",
    "register_imagenet",
    "register_task_dataset",
    "register_text_corpus",
    "register_toy_shapes",
    "register_toy_shapes_tasks",
    "register_webdataset_pairs",
    "render_toy_image",
    "thing_classes",
    "toy_shapes_categories",
    "toy_shapes_files",
    "toy_shapes_root",
    "toy_shapes_scene",
    "write_caption_json",
]
