"""What the task datasets (classification, retrieval, captioning, MLM) share: the task names,
the counted skipping of bad records, lazy registration, path patterns and the split of a
stream across (process rank, data-loader worker).

Every task dataset is registered in detectron2's catalogs with metadata ``task`` and
``evaluator_type`` (the same string, one of :data:`TASKS`); see ``datasets/README.md``.
"""
import collections
import glob
import logging
import os
import re
from typing import Callable, List, Optional, Sequence, Tuple, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.file_io import PathManager

__all__ = [
    "TASKS",
    "SkipCounter",
    "class_names",
    "expand_paths",
    "read_class_list",
    "register_task_dataset",
    "set_metadata",
    "stream_partition",
    "worker_slot",
]

logger = logging.getLogger(__name__)

TASKS = ("classification", "retrieval", "captioning", "mlm")

# Individual warnings per reason before only the summary is logged (a corpus with a bad
# member in every shard must not flood the log).
_WARN_FIRST = 5


class SkipCounter(collections.Counter):
    """Records skipped by reason (``{"empty_caption": 2, ...}``), each with a warning.

    The first few records of each reason are logged one by one, the rest only in the
    :meth:`summary` that the loaders log at the end of a load / pass over a stream.
    """

    def __init__(self, source: str = ""):
        super().__init__()
        self.source = source

    def skip(self, reason: str, detail: str) -> None:
        self[reason] += 1
        if self[reason] <= _WARN_FIRST:
            more = " (further ones are only counted)" if self[reason] == _WARN_FIRST else ""
            logger.warning(f"{self.source}: skipped ({reason}) {detail}{more}")

    def __reduce__(self):  # Counter's would pass the counts as ``source``
        return self.__class__, (self.source,), None, None, iter(self.items())

    def total(self) -> int:  # Counter.total exists from Python 3.10 only
        return sum(self.values())

    def summary(self) -> None:
        """Log one warning with every count, when anything was skipped."""
        if self.total():
            counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.items()))
            logger.warning(f"{self.source}: skipped {self.total()} record(s) ({counts})")


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task


def register_task_dataset(name: str, loader: Callable[[], object], task: str,
                          **metadata) -> str:
    """Register ``name`` -> ``loader`` lazily, with metadata ``task`` = ``evaluator_type``
    = ``task`` plus ``metadata``. Registering a name again with the same metadata is a
    no-op; with other metadata it replaces the earlier registration. Reads nothing."""
    _check_task(task)
    metadata = dict(metadata, task=task, evaluator_type=task)
    if name in DatasetCatalog.list():
        old = MetadataCatalog.get(name).as_dict()
        if all(k in old and old[k] == v for k, v in metadata.items()):
            return name
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    set_metadata(name, **metadata)
    return name


def set_metadata(dataset_name: str, **values) -> None:
    """Set metadata values, also those found at load time: detectron2's ``Metadata.set``
    refuses to change a value, here a changed one (a class list edited on disk) replaces the
    old value, with a warning.

    ``class_names`` is stored under that name *and* as ``thing_classes``: detectron2's
    ``Metadata`` treats "class_names" as an old alias of "thing_classes" (setting it sets
    only thing_classes, reading it warns), so it is written into the metadata's attributes
    directly, and both names read the same list without a warning.
    """
    meta = MetadataCatalog.get(dataset_name)
    for key, value in values.items():
        keys = ("thing_classes", "class_names") if key == "class_names" else (key,)
        for k in keys:
            if k in meta.__dict__ and meta.__dict__[k] != value:
                logger.warning(f"{dataset_name}: metadata {k!r} changed; replacing it")
                delattr(meta, k)
            if k not in meta.__dict__:
                object.__setattr__(meta, k, value)  # not Metadata's: see the docstring


def read_class_list(path: str) -> List[Tuple[str, str]]:
    """[(folder name, class name)] from a class list file, in label order.

    Format: one class a line, ``<folder> <names>``, where ``<names>`` is a comma-separated
    list whose first entry is the class name (``n01440764 tench, Tinca tinca`` -> folder
    "n01440764", name "tench"); a line with only a folder names the class after the folder.
    Blank lines are ignored; a folder listed twice is an error.
    """
    classes: List[Tuple[str, str]] = []
    with PathManager.open(path, "r") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            folder, _, names = line.partition(" ")
            name = names.split(",")[0].strip() or folder
            classes.append((folder, name))
    folders = [c[0] for c in classes]
    if len(set(folders)) != len(folders):
        dup = sorted({f for f in folders if folders.count(f) > 1})
        raise ValueError(f"{path}: class folder(s) listed more than once: {dup}")
    if not classes:
        raise ValueError(f"{path}: no classes")
    return classes


def class_names(dataset_name: str) -> List[str]:
    """The ``class_names`` of a classification dataset, before the dataset is loaded.

    Datasets whose classes are known without reading the disk (toy_shapes) have them in
    their metadata from registration; the others (ImageNet) name a ``class_list_file``,
    which is read here (only that file, not the image tree) and cached in the metadata.
    """
    meta = MetadataCatalog.get(dataset_name)
    if "class_names" not in meta.__dict__ and "thing_classes" in meta.__dict__:
        # detectron2's Metadata.set(class_names=...) stores them as thing_classes (an old
        # alias), so a dataset registered that way has its names there
        return list(meta.thing_classes)
    if "class_names" not in meta.__dict__:
        class_list_file = meta.get("class_list_file")
        if class_list_file is None:
            raise ValueError(f"dataset {dataset_name!r} has neither class_names nor a "
                             "class_list_file in its metadata")
        set_metadata(dataset_name, class_names=[n for _, n in read_class_list(class_list_file)])
    return list(meta.class_names)


# ------------------------------------------------------------------------ path patterns
_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _expand_braces(pattern: str) -> List[str]:
    """``shards/{00000..00002}.tar`` -> the three names (zero padding kept, as in
    webdataset's / img2dataset's shard specs); several ranges expand as a product."""
    match = _BRACE_RANGE.search(pattern)
    if match is None:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    width = len(lo) if lo.startswith("0") else 0
    if int(hi) < int(lo):
        raise ValueError(f"empty range {match.group(0)} in {pattern!r}")
    head, tail = pattern[:match.start()], pattern[match.end():]
    out = []
    for i in range(int(lo), int(hi) + 1):
        out += _expand_braces(f"{head}{i:0{width}d}{tail}")
    return out


def expand_paths(spec: Union[str, Sequence[str]]) -> List[str]:
    """Files named by ``spec``: a list of paths/patterns, or one pattern; each pattern may
    use a brace range ``{000..123}`` (names taken as they are) or glob characters (matched
    on disk, sorted). The order is kept; raises FileNotFoundError when nothing matches."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    paths: List[str] = []
    for pattern in patterns:
        for name in _expand_braces(os.fspath(pattern)):
            if glob.has_magic(name):
                paths += sorted(glob.glob(name))
            else:
                paths.append(name)
    if not paths:
        raise FileNotFoundError(f"no files match {spec!r}")
    return paths


# ------------------------------------------------------------------- rank/worker split
def worker_slot(rank: Optional[int] = None, world_size: Optional[int] = None
                ) -> Tuple[int, int]:
    """(this reader's index, number of readers) over all (rank, data-loader worker) pairs:
    ``rank * num_workers + worker_id`` of ``world_size * num_workers``. ``rank`` and
    ``world_size`` default to torch.distributed's (via detectron2's comm); the worker comes
    from ``torch.utils.data.get_worker_info()`` (0 of 1 outside a DataLoader worker)."""
    import torch.utils.data as torchdata  # noqa: PLC0415
    from detectron2.utils import comm  # noqa: PLC0415

    rank = comm.get_rank() if rank is None else int(rank)
    world_size = comm.get_world_size() if world_size is None else int(world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    info = torchdata.get_worker_info()
    worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
    return rank * num_workers + worker, world_size * num_workers


def stream_partition(num_files: int, slot: int, num_slots: int, split_by: str = "auto"
                     ) -> Tuple[List[int], Optional[Tuple[int, int]]]:
    """How reader ``slot`` of ``num_slots`` shares ``num_files`` files with the others.

    Returns (indices of the files it opens, None) when whole files are split (file i goes to
    slot ``i % num_slots``), or (all indices, (slot, num_slots)) when every reader opens
    every file and keeps the records whose running index r (counted over all files, in
    order) has ``r % num_slots == slot``. ``split_by``: "file", "sample", or "auto" (by file
    when there are at least as many files as readers, else by sample). Either way every
    record goes to exactly one reader, and the assignment depends only on
    (slot, num_slots), never on timing.
    """
    if split_by not in ("auto", "file", "sample"):
        raise ValueError(f"split_by must be 'auto', 'file' or 'sample', got {split_by!r}")
    if not 0 <= slot < num_slots:
        raise ValueError(f"slot {slot} outside {num_slots} readers")
    if split_by == "auto":
        split_by = "file" if num_files >= num_slots else "sample"
    if split_by == "file":
        return list(range(slot, num_files, num_slots)), None
    return list(range(num_files)), (slot, num_slots)


def owned(index: int, sample_split: Optional[Tuple[int, int]]) -> bool:
    """Whether record ``index`` (running index) belongs to this reader."""
    return sample_split is None or index % sample_split[1] == sample_split[0]
