"""Test data loader that leaves out the images its mapper cannot use.

detectron2's ``build_detection_test_loader`` wraps the mapper in ``MapDataset``, which
answers a None from the mapper by mapping another random image (in detectron2 0.6 with
``random.sample`` on a set, a TypeError on Python >= 3.11). At test time a substitute image
would be evaluated twice and the bad one silently never, so here a skipped image is simply
not passed to the model: the loader drops it, warns and counts it. The evaluators of
``unip_v2.evaluation`` take their ground truth from the dataset's json, so such an image is
still part of the evaluation, as an image with no detections (its objects lower recall and
AP: the score is not inflated by leaving hard or broken images out). Nothing here reads
"file_name": text-only records (masked language modelling's {"text"}) pass through too.
"""
import logging
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch.utils.data as torchdata

from detectron2.data import get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import InferenceSampler

__all__ = ["SkippingTestLoader", "build_test_loader"]

logger = logging.getLogger(__name__)


class _MapWithoutRetry(torchdata.Dataset):
    """``mapper(dataset[i])``, None included (no substitute index, unlike MapDataset)."""

    def __init__(self, dataset: torchdata.Dataset, mapper: Callable):
        self._dataset = dataset
        self._mapper = mapper

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int) -> Optional[Dict[str, Any]]:
        return self._mapper(self._dataset[index])


class SkippingTestLoader:
    """Iterable of batches (lists of mapped dicts) over a test dataset, without the images
    the mapper returned None for. ``len()`` is the number of batches of the full dataset
    (an upper bound, as detectron2's ``inference_on_dataset`` needs a length).

    Attributes:
        num_skipped: images left out so far by the current/last pass (counted here, in the
            main process, so it is right whatever the number of workers).
        num_images: images in the dataset (on this rank: InferenceSampler shards it).
    """

    def __init__(self, loader: torchdata.DataLoader, dataset_name: str, num_images: int):
        self._loader = loader
        self.dataset_name = dataset_name
        self.num_images = num_images
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        self.num_skipped = 0
        for batch in self._loader:
            kept = [x for x in batch if x is not None]
            self.num_skipped += len(batch) - len(kept)
            if kept:
                yield kept
        if self.num_skipped:
            logger.warning(
                f"Test loader of {self.dataset_name}: {self.num_skipped} record(s) skipped "
                f"(the mapper's warnings above say why) and not given to the model; a "
                "detection evaluator counts each as an image with no detections, the MLM "
                "evaluator leaves a skipped text out."
            )


def build_test_loader(dataset_name: str, mapper: Callable, num_workers: int = 0
                      ) -> SkippingTestLoader:
    """One image per batch over ``dataset_name`` (all images, none filtered, sharded across
    ranks like detectron2's test loader), mapped by ``mapper``; images it returns None for
    are skipped (see the module docstring)."""
    dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    dataset = _MapWithoutRetry(DatasetFromList(dicts, copy=False), mapper)
    sampler = InferenceSampler(len(dataset))
    loader = torchdata.DataLoader(dataset, batch_size=1, sampler=sampler,
                                  num_workers=num_workers, collate_fn=trivial_batch_collator)
    return SkippingTestLoader(loader, dataset_name, len(sampler))
