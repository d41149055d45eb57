"""Datasets (registration, generation) and dataset mappers."""
from . import dataset_mappers  # noqa: F401
from . import datasets  # noqa: F401  (registers toy_shapes_*)
