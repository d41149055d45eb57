"""Training data of several tasks (Uni-Perceiver v2, Sec. 4.4, Table 8): one infinite,
resumable stream per task-dataset, and the task drawn at every iteration.

- Every dataset of DATASETS.TRAIN is a **task-dataset** k: its task (from its metadata), its
  own stream (`ResumableTrainLoader`, sharded over the processes, seeded from (SEED, k)), its
  own per-process batch size (MODEL.<TASK>.BATCH_SIZE) and mapper, its sampling ratio s_k and
  its weight w_k.
- **Unmixed sampling** (DATALOADER.TASK_SAMPLING "unmixed", the paper's): at iteration i every
  process trains the same task-dataset, drawn with probabilities s_k from a generator seeded
  by (SEED, i) alone (`TaskSampler`), so the processes agree without communicating and a
  resumed run draws the same sequence. Only the drawn task's stream moves.
- **Mixed sampling** ("mixed", Table 4's ablation): every iteration holds one batch of every
  task-dataset; their losses are summed.
- s_k: DATALOADER.SAMPLING_RATIOS (one per DATASETS.TRAIN entry), normalised to sum 1; empty
  = every task equal, its share split over its datasets in proportion to the square root of
  their sizes (Table 8's rule).
- w_k: the task's weight (`Task.weight`: its LOSS_WEIGHT, Eq. 7), split over the task's
  datasets in proportion to their s_k (Table 8: w_k = w_task * s_k / s_task).

`MultiTaskTrainLoader.state_dict()` holds the next iteration, how often each task-dataset has
been drawn, and every stream's position; the trainer saves it in each checkpoint.
"""
import bisect
import itertools
import math
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Sequence, Union

from ..utils.rng import derived_seed

__all__ = ["TaskBatch", "TaskDataset", "TaskSampler", "MultiTaskTrainLoader",
           "sampling_ratios", "task_dataset_weights"]

# a fixed tag mixed into the sampler's seeds, so its draws never coincide with another
# generator seeded from (SEED, i)
_SAMPLER_TAG = 0x7A5C


@dataclass(frozen=True)
class TaskDataset:
    """One task-dataset of multi-task training."""
    label: str            # name in logs and metrics: the task, or "task:dataset" if it has several
    dataset: str          # its DATASETS.TRAIN entry
    task: str             # the task its metadata names
    sampling_ratio: float  # s_k (all task-datasets' sum to 1)
    weight: float         # w_k


@dataclass
class TaskBatch:
    """A batch of one task-dataset: ``inputs`` as its mapper gives them (each naming the task)."""
    index: int
    task_dataset: TaskDataset
    inputs: List[Dict[str, Any]]


def sampling_ratios(tasks: Sequence[str], sizes: Sequence[int],
                    given: Sequence[float] = ()) -> List[float]:
    """s_k of each task-dataset (see the module docstring), summing to 1."""
    if len(tasks) != len(sizes):
        raise ValueError(f"{len(tasks)} tasks for {len(sizes)} dataset sizes")
    if given:
        if len(given) != len(tasks):
            raise ValueError(f"DATALOADER.SAMPLING_RATIOS has {len(given)} entries for "
                             f"{len(tasks)} datasets in DATASETS.TRAIN: give one per dataset, "
                             f"or none for the default")
        if not all(r > 0 for r in given):
            raise ValueError(f"DATALOADER.SAMPLING_RATIOS must be positive, got {list(given)}")
        total = float(sum(given))
        return [float(r) / total for r in given]
    if not all(n > 0 for n in sizes):
        raise ValueError(f"every training dataset needs at least one element, sizes {list(sizes)}")
    names = list(dict.fromkeys(tasks))
    roots = {t: sum(math.sqrt(n) for u, n in zip(tasks, sizes) if u == t) for t in names}
    return [math.sqrt(n) / roots[t] / len(names) for t, n in zip(tasks, sizes)]


def task_dataset_weights(tasks: Sequence[str], ratios: Sequence[float],
                         task_weights: Dict[str, float]) -> List[float]:
    """w_k of each task-dataset: its task's weight times its share of the task's s."""
    group = {t: sum(r for u, r in zip(tasks, ratios) if u == t) for t in set(tasks)}
    return [task_weights[t] * r / group[t] for t, r in zip(tasks, ratios)]


class TaskSampler:
    """The task-dataset of iteration i, drawn with probabilities `ratios` from (seed, i)
    alone: the same on every process and after a resume, whatever was drawn before."""

    def __init__(self, ratios: Sequence[float], seed: int):
        if not ratios or any(r <= 0 for r in ratios):
            raise ValueError(f"TaskSampler: ratios must be positive, got {list(ratios)}")
        total = float(sum(ratios))
        self.cumulative = list(itertools.accumulate(r / total for r in ratios))
        self.seed = int(seed)

    def __call__(self, iteration: int) -> int:
        u = random.Random(derived_seed(self.seed, _SAMPLER_TAG, iteration)).random()
        return min(bisect.bisect_right(self.cumulative, u), len(self.cumulative) - 1)


class MultiTaskTrainLoader:
    """An infinite iterable of training batches of several task-datasets: a `TaskBatch` per
    iteration (unmixed) or a list with one `TaskBatch` per task-dataset (mixed). Resumable
    like `ResumableTrainLoader` (`state_dict` / `load_state_dict` before the first batch)."""

    def __init__(self, task_datasets: Sequence[TaskDataset], loaders: Sequence,
                 seed: int, mode: str = "unmixed"):
        if mode not in ("unmixed", "mixed"):
            raise ValueError(f"DATALOADER.TASK_SAMPLING must be 'unmixed' or 'mixed', got {mode!r}")
        if len(task_datasets) != len(loaders):
            raise ValueError(f"{len(task_datasets)} task-datasets for {len(loaders)} loaders")
        self.task_datasets, self.loaders, self.mode = list(task_datasets), list(loaders), mode
        self.sampler = TaskSampler([t.sampling_ratio for t in self.task_datasets], seed)
        self.iteration = 0                            # the next batch's iteration
        self.times_drawn = [0] * len(self.task_datasets)

    def state_dict(self) -> Dict[str, Any]:
        return {"iteration": self.iteration, "seed": self.sampler.seed, "mode": self.mode,
                "labels": [t.label for t in self.task_datasets],
                "times_drawn": list(self.times_drawn),
                "loaders": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        labels = [t.label for t in self.task_datasets]
        if list(state["labels"]) != labels:
            raise ValueError(f"the checkpoint's training data holds the task-datasets "
                             f"{list(state['labels'])}, this run {labels}: resume with the "
                             f"same DATASETS.TRAIN (in the same order)")
        self.iteration = int(state["iteration"])
        self.sampler.seed = int(state["seed"])
        self.times_drawn = [int(n) for n in state["times_drawn"]]
        for loader, s in zip(self.loaders, state["loaders"]):
            loader.load_state_dict(s)

    def _batch(self, k: int, streams: List[Iterator]) -> TaskBatch:
        self.times_drawn[k] += 1
        return TaskBatch(k, self.task_datasets[k], next(streams[k]))

    def __iter__(self) -> Iterator[Union[TaskBatch, List[TaskBatch]]]:
        # each stream starts at its first next() (ResumableTrainLoader): a task never drawn
        # starts no workers
        streams = [iter(loader) for loader in self.loaders]
        while True:
            if self.mode == "mixed":
                out = [self._batch(k, streams) for k in range(len(streams))]
            else:
                out = self._batch(self.sampler(self.iteration), streams)
            self.iteration += 1
            yield out
