"""Datasets. Importing this package registers the toy datasets in detectron2's catalogs:
``toy_shapes_train``, ``toy_shapes_val`` and ``toy_shapes_novel`` under ``$DETECTRON2_DATASETS/toy_shapes``
(nothing is generated or read here; see ``tools/make_toy_dataset.py``)."""
from .metadata import thing_classes
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

register_toy_shapes(toy_shapes_root())

__all__ = [
    "GENERATOR_VERSION",
    "TOY_SHAPES_CATEGORIES",
    "TOY_SHAPES_NOVEL_CATEGORIES",
    "RenderParams",
    "ToyScene",
    "ensure_toy_shapes",
    "generate_toy_shapes",
    "load_toy_shapes_json",
    "register_toy_shapes",
    "render_toy_image",
    "thing_classes",
    "toy_shapes_categories",
    "toy_shapes_files",
    "toy_shapes_root",
    "toy_shapes_scene",
]
