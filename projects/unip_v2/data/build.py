"""Training data loader: detectron2's, with a MapDataset whose skip-and-retry works.

A mapper returns None for an image it cannot use (a corrupt file, say); detectron2's
MapDataset should then try another random index, but in 0.6 it draws that index with
`random.sample` on a set, which Python >= 3.11 rejects (TypeError), so the first corrupt
image would stop training. RetryingMapDataset draws from a sorted list instead.
"""
import logging

from detectron2.data import DatasetFromList, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.common import MapDataset
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler

__all__ = ["RetryingMapDataset", "build_train_loader"]


class RetryingMapDataset(MapDataset):
    """MapDataset over a map-style dataset: when map_func returns None for an index, warn
    and try other random indices (ones that never failed) until one maps."""

    def __getitem__(self, idx):
        cur_idx, retries = int(idx), 0
        while True:
            data = self._map_func(self._dataset[cur_idx])
            if data is not None:
                self._fallback_candidates.add(cur_idx)
                return data
            retries += 1
            self._fallback_candidates.discard(cur_idx)
            if not self._fallback_candidates:
                raise RuntimeError("RetryingMapDataset: the mapper returned None for every "
                                   "element it tried; no usable element is left")
            cur_idx = self._rng.choice(sorted(self._fallback_candidates))
            if retries % 3 == 0:
                logging.getLogger(__name__).warning(
                    "RetryingMapDataset: mapping failed for index %d, %d retries so far",
                    idx, retries)


def build_train_loader(cfg, mapper):
    """detectron2's train loader over cfg.DATASETS.TRAIN, mapped by `mapper` with retries.

    Called without `cfg` on purpose: given a cfg, detectron2 0.6 would wrap the already
    mapped dataset in its default DatasetMapper a second time.
    """
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    dataset = RetryingMapDataset(DatasetFromList(dicts, copy=False), mapper)
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        sampler = TrainingSampler(len(dataset))
    elif name == "RepeatFactorTrainingSampler":
        sampler = RepeatFactorTrainingSampler(
            RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
                dicts, cfg.DATALOADER.REPEAT_THRESHOLD))
    else:
        raise NotImplementedError(f"DATALOADER.SAMPLER_TRAIN={name!r} is not supported by "
                                  "unip-v2's train loader (TrainingSampler, "
                                  "RepeatFactorTrainingSampler)")
    return build_detection_train_loader(
        dataset=dataset, mapper=None, sampler=sampler,
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS)
