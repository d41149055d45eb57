"""Training data loader whose stream is a pure function of (seed, position), so a resumed run
sees exactly the batches an uninterrupted one would.

detectron2's loader cannot resume: its sampler restarts from the seed, each worker seeds its
augmentations from the loader's creation, and aspect-ratio grouping keeps leftovers in
worker buckets. Here:

- the **index stream** (`IndexStream`) gives the dataset index at every position of an
  infinite stream: epoch e is a permutation drawn from (seed, e) alone (with repeat factors,
  detectron2's stochastic rounding drawn from (seed, e) too);
- the **batch** of global step g on process r holds positions
  [S + g*G + r*B, S + g*G + (r+1)*B), where B is the per-process batch size, G = B x world
  size and S the position the loader started at (0, or the checkpoint's);
- the **augmentations** of the sample at position p run with every random generator seeded
  from (seed, p) (`fork_rng`), and leave the process's generators as they were: the model's
  random numbers (denoising, point sampling, MoE noise) do not depend on whether mapping runs
  in this process or in workers;
- a sample the mapper cannot use (it returns None: unreadable image, say) is replaced by an
  index drawn from (seed, p, attempt), so the replacement is reproducible too;
- with DATALOADER.NUM_WORKERS = W, worker w maps steps w, w + W, ...: torch's DataLoader
  returns them in step order, so the stream does not depend on W.

The loader's `state_dict()` is the seed and the position of the next batch; the trainer saves
it in every checkpoint and restores it before the first batch is drawn.

DATALOADER.ASPECT_RATIO_GROUPING is not applied: it only reorders images so that a batch
holds one orientation, and the training mappers here (LSJ) give every image the same fixed
square size.
"""
import bisect
import itertools
import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from detectron2.data import DatasetFromList, get_detection_dataset_dicts
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.utils import comm

from ..utils.rng import derived_seed, fork_rng

__all__ = ["IndexStream", "ResumableTrainLoader", "batch_per_process", "build_train_loader",
           "train_seed"]

logger = logging.getLogger(__name__)

# a mapper that returns None this many times in a row for one position stops training: the
# dataset is unusable, and retrying forever would hang
MAX_ATTEMPTS = 50


class IndexStream:
    """An infinite stream of dataset indices, each a pure function of (seed, position).

    Epoch e is a shuffled pass over the dataset (TrainingSampler's shuffling) drawn from a
    generator seeded with (seed, e); with `repeat_factors`, index i appears floor(r_i) times
    plus once more with probability frac(r_i) (RepeatFactorTrainingSampler's stochastic
    rounding), also drawn from (seed, e), so epochs differ in length.
    """

    def __init__(self, size: int, seed: int, repeat_factors: Optional[torch.Tensor] = None):
        if size <= 0:
            raise ValueError(f"IndexStream: the dataset is empty (size {size})")
        if repeat_factors is not None and len(repeat_factors) != size:
            raise ValueError(f"IndexStream: {len(repeat_factors)} repeat factors for {size} "
                             f"elements")
        self.size, self.seed = size, int(seed)
        self.repeat_factors = repeat_factors
        self._ends: List[int] = []          # cumulative epoch lengths, as far as computed
        self._cached = (None, None)         # (epoch, its indices)

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(derived_seed(self.seed, epoch))

    def epoch(self, e: int) -> torch.Tensor:
        """The dataset indices of epoch e, in stream order (int64)."""
        if self._cached[0] == e:
            return self._cached[1]
        g = self._generator(e)
        if self.repeat_factors is None:
            indices = torch.randperm(self.size, generator=g)
        else:
            whole = self.repeat_factors.floor()
            extra = torch.rand(self.size, generator=g) < (self.repeat_factors - whole)
            counts = (whole + extra).long()
            indices = torch.repeat_interleave(torch.arange(self.size), counts)
            indices = indices[torch.randperm(len(indices), generator=g)]
        self._cached = (e, indices)
        return indices

    def _epoch_of(self, position: int):
        if self.repeat_factors is None:
            return divmod(position, self.size)
        while not self._ends or self._ends[-1] <= position:
            length = len(self.epoch(len(self._ends)))
            self._ends.append((self._ends[-1] if self._ends else 0) + length)
        e = bisect.bisect_right(self._ends, position)
        return e, position - (self._ends[e - 1] if e else 0)

    def __getitem__(self, position: int) -> int:
        if position < 0:
            raise IndexError(f"IndexStream: negative position {position}")
        e, offset = self._epoch_of(position)
        return int(self.epoch(e)[offset])


def _identity(batch):
    return batch


class _StepBatches(IterableDataset):
    """Batches of steps start, start + 1, ... for one process (see the module docstring); in a
    DataLoader worker, only the steps that fall to that worker."""

    def __init__(self, dataset, mapper: Callable, stream: IndexStream, start: int,
                 batch_size: int, rank: int, world_size: int):
        self.dataset, self.mapper, self.stream = dataset, mapper, stream
        self.start, self.batch_size = start, batch_size
        self.rank, self.world_size = rank, world_size

    def map_position(self, position: int) -> Dict[str, Any]:
        for attempt in range(MAX_ATTEMPTS):
            if attempt == 0:
                index = self.stream[position]
            else:
                g = torch.Generator().manual_seed(
                    derived_seed(self.stream.seed, position, attempt))
                index = int(torch.randint(len(self.dataset), (1,), generator=g))
            with fork_rng(derived_seed(self.stream.seed, position, attempt, 1)):
                data = self.mapper(self.dataset[index])
            if data is not None:
                return data
            logger.warning(f"the mapper returned no sample for dataset index {index} (stream "
                           f"position {position}); drawing a replacement")
        raise RuntimeError(f"the mapper returned None {MAX_ATTEMPTS} times in a row at stream "
                           f"position {position}: no usable element is left in the dataset?")

    def batch(self, step: int) -> List[Dict[str, Any]]:
        first = self.start + (step * self.world_size + self.rank) * self.batch_size
        return [self.map_position(p) for p in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for step in itertools.count(worker, workers):
            yield self.batch(step)


class ResumableTrainLoader:
    """An infinite iterable of training batches (lists of mapped dicts) that can be saved and
    restored: `state_dict()` gives the seed and the stream position of the next batch;
    `load_state_dict()` before the first batch makes the loader continue from there.

    The torch DataLoader (and its workers) starts at the first `next()`, not at `iter()`:
    detectron2's trainer calls `iter()` when it is built, before a checkpoint is loaded.
    """

    def __init__(self, dataset: Sequence, mapper: Callable, stream: IndexStream,
                 batch_size: int, num_workers: int = 0):
        self.dataset, self.mapper, self.stream = dataset, mapper, stream
        self.batch_size, self.num_workers = batch_size, num_workers
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()
        self.position = 0   # stream position of the next batch's step (all processes)

    def state_dict(self) -> Dict[str, int]:
        return {"seed": self.stream.seed, "position": self.position}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if int(state["seed"]) != self.stream.seed:
            logger.info(f"train loader: continuing the checkpoint's data stream (seed "
                        f"{state['seed']}, not {self.stream.seed})")
            self.stream = IndexStream(self.stream.size, int(state["seed"]),
                                      self.stream.repeat_factors)
        self.position = int(state["position"])

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        steps = _StepBatches(self.dataset, self.mapper, self.stream, self.position,
                             self.batch_size, self.rank, self.world_size)
        if self.num_workers == 0:
            batches = (steps.batch(step) for step in itertools.count())
        else:
            # the DataLoader's own generator: by default it draws its base seed from the
            # global torch generator, which would shift the model's random numbers
            batches = iter(DataLoader(steps, batch_size=None, num_workers=self.num_workers,
                                      collate_fn=_identity, generator=torch.Generator(),
                                      persistent_workers=False))
        for batch in batches:
            self.position += self.batch_size * self.world_size
            yield batch


def batch_per_process(cfg, batch_size: int = 0) -> int:
    """Samples per process and iteration: ``batch_size`` (a task's MODEL.<TASK>.BATCH_SIZE,
    per process as in the paper's Table 8) when positive, else SOLVER.IMS_PER_BATCH split
    over the processes."""
    if batch_size > 0:
        return int(batch_size)
    world = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible "
                         f"by the number of processes ({world})")
    return cfg.SOLVER.IMS_PER_BATCH // world


def build_train_loader(cfg, mapper: Callable, batch_size: int = 0,
                       dataset_names: Optional[Sequence[str]] = None,
                       seed: Optional[int] = None) -> ResumableTrainLoader:
    """The resumable loader over ``dataset_names`` (default cfg.DATASETS.TRAIN; see the module
    docstring), with `batch_per_process` (cfg, batch_size) samples per process and iteration.

    The stream's seed is ``seed``, else cfg.SEED, or, when SEED < 0, one random seed shared by
    all processes (saved in checkpoints, so a resumed run keeps its stream).
    """
    dicts = get_detection_dataset_dicts(
        list(cfg.DATASETS.TRAIN if dataset_names is None else dataset_names),
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    per_process = batch_per_process(cfg, batch_size)
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        repeat_factors = None
    elif name == "RepeatFactorTrainingSampler":
        repeat_factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dicts, cfg.DATALOADER.REPEAT_THRESHOLD)
    else:
        raise NotImplementedError(f"DATALOADER.SAMPLER_TRAIN={name!r} is not supported by "
                                  "unip-v2's train loader (TrainingSampler, "
                                  "RepeatFactorTrainingSampler)")
    if seed is None:
        seed = train_seed(cfg)
    dataset = DatasetFromList(dicts, copy=False)
    return ResumableTrainLoader(dataset, mapper, IndexStream(len(dataset), seed, repeat_factors),
                                per_process,
                                num_workers=cfg.DATALOADER.NUM_WORKERS)


def train_seed(cfg) -> int:
    """cfg.SEED, or, when SEED < 0, one random seed shared by all processes."""
    return cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
