"""Streamed corpora: image-text pairs in WebDataset tar shards (CC3M, CC12M, SBU, YFCC, VG as
img2dataset writes them) and plain-text corpora for masked language modelling (Books&Wiki).

Both are iterable datasets (``torch.utils.data.IterableDataset``): DatasetCatalog.get(name)
returns the stream object, whose iteration yields one record at a time and holds at most one
sample's tar members (a shard is never read whole into memory). Each (process rank,
data-loader worker) pair reads its own part of the files, deterministically, see
:func:`~unip_v2.data.datasets.task_common.stream_partition`. Bad records are skipped with a
warning and counted in ``skipped`` (a :class:`SkipCounter`, reset at the start of each pass;
in a DataLoader each worker has its own copy and logs its own counts when its pass ends).

Shard layout (img2dataset's ``output_format="webdataset"``)::

    00000.tar        members {key}.jpg, {key}.txt, {key}.json, consecutive per key
    00000.parquet    optional, not read (img2dataset's per-shard metadata)
    00000_stats.json optional, not read

Why Python's ``tarfile`` and not the ``webdataset`` package: a skipped sample must be
counted by reason (webdataset's error handlers only log or re-raise), a tar truncated at a
member boundary ends silently in both (checked here through the end-of-archive blocks), the
(rank, worker) split must also work at sample level when there are fewer shards than readers,
and the layout is simple enough that it adds no dependency.
"""
import collections
import gzip
import io
import logging
import random
import tarfile
import zlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch.utils.data as torchdata
from PIL import Image

from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager

from ..image_io import UNREADABLE_IMAGE_ERRORS, _orient, _to_eight_bit
from .task_common import (
    SkipCounter,
    expand_paths,
    owned,
    register_task_dataset,
    stream_partition,
    worker_slot,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "TextCorpus",
    "WebDatasetPairs",
    "decode_image",
    "register_text_corpus",
    "register_webdataset_pairs",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")  # img2dataset's encode_format choices
_BLOCK = tarfile.BLOCKSIZE
_KEEP = 4 * tarfile.RECORDSIZE  # bytes the tail recorder keeps (tarfile reads RECORDSIZE)
# What a broken archive raises in stream mode: tarfile's errors, a gzip stream cut short
# (EOFError) or corrupt (zlib.error, gzip.BadGzipFile is an OSError), read errors.
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def decode_image(data: bytes, name: str = "") -> np.ndarray:
    """HxWx3 uint8 RGB from encoded bytes, with ``image_io``'s rules (EXIF orientation,
    16-bit grey reduced to 8 bits, unknown modes refused). Raises one of
    ``UNREADABLE_IMAGE_ERRORS`` for an undecodable or truncated image."""
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now: truncation raises here
    is_png = image.format == "PNG"
    image = _to_eight_bit(_orient(image, name, None), is_png, name)
    return utils.convert_PIL_to_numpy(image, "RGB")


class _TailRecorder(io.RawIOBase):
    """A read-only stream that remembers its last bytes, to check the end of a tar."""

    def __init__(self, f):
        super().__init__()
        self._f = f
        self._read = getattr(f, "read1", f.read)
        self.pos = 0
        self._chunks = collections.deque()  # (start position, bytes), the last _KEEP bytes
        self._kept = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        # read1: what is there now (a gzip stream cut short raises only on the next call,
        # after everything decompressible was passed on; read() would drop it).
        data = self._read(len(b))
        n = len(data)
        b[:n] = data
        if n:
            self._chunks.append((self.pos, bytes(data)))
            self._kept += n
            while self._kept - len(self._chunks[0][1]) >= _KEEP:
                self._kept -= len(self._chunks.popleft()[1])
        self.pos += n
        return n

    def ends_at(self, offset: int) -> bool:
        """Whether two zero blocks (a tar's end-of-archive marker) start at ``offset``."""
        while self.pos < offset + 2 * _BLOCK and self.read(tarfile.RECORDSIZE):
            pass
        if not self._chunks or self._chunks[0][0] > offset:
            return False
        start = self._chunks[0][0]
        tail = b"".join(chunk for _, chunk in self._chunks)
        return tail[offset - start:offset - start + 2 * _BLOCK] == bytes(2 * _BLOCK)


def _split_name(name: str) -> Tuple[str, str]:
    """WebDataset's member naming: "dir/000123.jpg" -> ("dir/000123", "jpg"); the key ends
    at the first dot of the base name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


class _ShardedStream(torchdata.IterableDataset):
    """Files split across (rank, worker), optionally in a per-epoch shuffled order."""

    def __init__(self, files: Union[str, Sequence[str]], name: str = "",
                 split_by: str = "auto", shuffle: bool = False, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__()
        self.files = files
        self.name = name or str(files)
        self.split_by = split_by
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.rank = rank
        self.world_size = world_size
        self.skipped = SkipCounter(self.name)

    def set_epoch(self, epoch: int) -> None:
        """With ``shuffle``, the file order of the next pass (the same on every reader)."""
        self.epoch = int(epoch)

    def _my_files(self) -> Tuple[List[str], Optional[Tuple[int, int]]]:
        files = expand_paths(self.files)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(files)
        slot, num_slots = worker_slot(self.rank, self.world_size)
        indices, sample_split = stream_partition(len(files), slot, num_slots, self.split_by)
        return [files[i] for i in indices], sample_split

    def __iter__(self):
        self.skipped = SkipCounter(self.name)
        files, sample_split = self._my_files()
        try:
            yield from self._records(files, sample_split)
        finally:
            self.skipped.summary()

    def _records(self, files, sample_split):
        raise NotImplementedError


class WebDatasetPairs(_ShardedStream):
    """Image-text pairs from WebDataset tar shards (uncompressed or gzipped tars).

    Yields ``{"image": HxWx3 uint8 RGB ndarray, "captions": [str], "image_id": key}``; the
    caption is the ``{key}.txt`` member (UTF-8, stripped; one caption per sample, as
    img2dataset writes), ``{key}.json`` and other members are ignored.

    Args:
        shards: a list of tar paths, or a pattern: brace range ("cc3m/{00000..00331}.tar")
            or glob ("cc3m/*.tar"); expanded when iterated.
        name: used in warnings.
        split_by: "file" (whole shards per reader), "sample" (every reader reads every
            shard and keeps every n-th sample) or "auto" (by file when there are at least
            as many shards as readers).
        shuffle, seed: shuffle the shard order per epoch (:meth:`set_epoch`), identically
            on every reader, before the split.
        rank, world_size: override torch.distributed's (tests, or custom launchers).

    Skipped and counted in ``skipped``: ``missing_image``, ``undecodable_image``,
    ``missing_caption``, ``undecodable_caption``, ``empty_caption``, and per shard
    ``unreadable_shard`` (cannot be opened) and ``truncated_or_corrupt_tar`` (the rest of
    that shard is lost; the samples read before are kept).
    """

    def _records(self, files, sample_split) -> Iterator[Dict]:
        index = 0  # running sample index over this reader's files (sample split)
        for path in files:
            for key, members in self._groups(path, sample_split, index):
                index += 1
                if members is None:
                    continue  # another reader's sample: neither decoded nor checked
                record = self._decode(key, members, path)
                if record is not None:
                    yield record
            # the index went on through the shard, so every reader agrees on it

    def _groups(self, path: str, sample_split, first_index: int):
        """(key, {suffix: bytes} or None when not owned) per sample of one shard, in order;
        broken shards are counted (on the reader owning the sample where it broke)."""
        index = first_index
        key, members = None, {}
        try:
            f = PathManager.open(path, "rb")
        except OSError as e:
            if owned(index, sample_split):
                self.skipped.skip("unreadable_shard", f"{path}: {e}")
            return
        with f:
            raw = f
            head = raw.read(2)
            stream = io.BufferedReader(_Prepend(head, raw))
            if head == b"\x1f\x8b":
                stream = gzip.GzipFile(fileobj=stream, mode="rb")
            recorder = _TailRecorder(stream)
            try:
                with tarfile.open(fileobj=recorder, mode="r|") as tar:
                    for info in tar:
                        if not info.isfile():
                            continue
                        member_key, suffix = _split_name(info.name)
                        if member_key != key:
                            if key is not None:
                                yield key, (members if owned(index, sample_split) else None)
                                index += 1
                            key, members = member_key, {}
                        if owned(index, sample_split):
                            # Read now: a stream-mode tar cannot go back to a member.
                            members[suffix] = tar.extractfile(info).read()
                    complete = recorder.ends_at(tar.offset)
            except _TAR_ERRORS as e:
                complete, error = False, f"{type(e).__name__}: {e}"
            else:
                error = f"no end-of-archive marker after {recorder.pos} bytes"
        if not complete:
            # The last group may miss members that were cut off: dropped with the shard's
            # rest, and counted once, by the reader owning it.
            if owned(index, sample_split):
                self.skipped.skip("truncated_or_corrupt_tar",
                                  f"{path}: {error}; the rest of this shard is lost")
            return
        if key is not None:
            yield key, (members if owned(index, sample_split) else None)

    def _decode(self, key: str, members: Dict[str, bytes], path: str) -> Optional[Dict]:
        where = f"sample {key!r} of {path}"
        image_suffix = next((s for s in IMAGE_SUFFIXES if s in members), None)
        if image_suffix is None:
            self.skipped.skip("missing_image", where)
            return None
        if "txt" not in members:
            self.skipped.skip("missing_caption", where)
            return None
        try:
            caption = members["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            self.skipped.skip("undecodable_caption", f"{where}: {e}")
            return None
        if not caption:
            self.skipped.skip("empty_caption", where)
            return None
        try:
            image = decode_image(members[image_suffix], where)
        except UNREADABLE_IMAGE_ERRORS as e:
            self.skipped.skip("undecodable_image", f"{where}: {type(e).__name__}: {e}")
            return None
        return {"image": image, "captions": [caption], "image_id": key}


class _Prepend(io.RawIOBase):
    """``head`` followed by the rest of ``f`` (to sniff the gzip magic without seeking)."""

    def __init__(self, head: bytes, f):
        super().__init__()
        self._head = head
        self._f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._f.read(len(b))
        b[:len(data)] = data
        return len(data)


class TextCorpus(_ShardedStream):
    """Lines of plain-text files (one sentence or paragraph a line, UTF-8), for masked
    language modelling: yields ``{"text": str}`` (stripped; blank lines are skipped, and
    not counted: they separate documents). Grouping into fixed-length token sequences is
    the task's job.

    Same arguments as :class:`WebDatasetPairs` (``files`` instead of ``shards``); with a
    sample split, the running index counts non-blank lines. Skipped and counted:
    ``undecodable_line`` (not UTF-8) and ``unreadable_file``.
    """

    def _records(self, files, sample_split) -> Iterator[Dict]:
        index = 0
        for path in files:
            try:
                f = PathManager.open(path, "rb")
            except OSError as e:
                if owned(index, sample_split):
                    self.skipped.skip("unreadable_file", f"{path}: {e}")
                continue
            with f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    line_index, index = index, index + 1
                    if not owned(line_index, sample_split):
                        continue
                    try:
                        text = line.decode("utf-8").strip()
                    except UnicodeDecodeError as e:
                        self.skipped.skip("undecodable_line", f"{path}:{line_no}: {e}")
                        continue
                    if text:  # blank after decoding (e.g. only U+3000 spaces): not counted
                        yield {"text": text}


def register_webdataset_pairs(name: str, shards: Union[str, Sequence[str]],
                              task: str = "retrieval", **kwargs) -> str:
    """Register ``name``: DatasetCatalog.get(name) returns a :class:`WebDatasetPairs` over
    ``shards`` (keyword arguments go to it); metadata ``task`` = ``evaluator_type`` =
    ``task``, ``streamed=True``, ``shards``, ``stream_options`` (the keyword arguments).
    Reads nothing."""
    shards = shards if isinstance(shards, str) else list(shards)
    return register_task_dataset(
        name, lambda: WebDatasetPairs(shards, name=name, **kwargs), task=task,
        streamed=True, shards=shards, stream_options=dict(kwargs))


def register_text_corpus(name: str, files: Union[str, Sequence[str]], task: str = "mlm",
                         **kwargs) -> str:
    """Register ``name``: DatasetCatalog.get(name) returns a :class:`TextCorpus` over
    ``files``; metadata ``task`` = ``evaluator_type`` = ``task``, ``streamed=True``,
    ``text_files``, ``stream_options``. Reads nothing."""
    files = files if isinstance(files, str) else list(files)
    return register_task_dataset(
        name, lambda: TextCorpus(files, name=name, **kwargs), task=task, streamed=True,
        text_files=files, stream_options=dict(kwargs))
