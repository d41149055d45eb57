"""Streamed corpora of Uni-Perceiver v2's pre-training (Sec. 4.1 / Appendix A: image-text
pairs from CC3M, CC12M, SBU, YFCC and Visual Genome; Books&Wiki text for masked language
modelling): WebDataset tar shards in img2dataset's layout and plain-text files.

Every shard is a real tar written here with ``tarfile`` in img2dataset's member order
({key}.jpg, {key}.txt, {key}.json per sample), next to the .parquet / _stats.json files it
also writes. The oracles: the captions and keys written, PIL's own decoding of the image
bytes written, hand-counted skips, and hand-worked (rank, worker) assignments.
"""
import collections
import io
import json
import logging
import os
import tarfile
import uuid

import numpy as np
import pytest
import torch.utils.data as torchdata
from PIL import Image

import unip_v2  # noqa: F401  (first: makes detectron2 importable)

from detectron2.data import DatasetCatalog, MetadataCatalog

from unip_v2.data.datasets import (
    TextCorpus,
    WebDatasetPairs,
    register_text_corpus,
    register_webdataset_pairs,
)
from unip_v2.data.datasets.task_common import expand_paths, stream_partition

RED, BLUE = (230, 20, 20), (20, 20, 230)


# --------------------------------------------------------------------------- helpers
def _image_bytes(colour, fmt="JPEG", size=8):
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[:, :] = colour
    rgb[: size // 2, : size // 2] = (255 - colour[0], 255 - colour[1], 255 - colour[2])
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _pil_rgb(data):
    """The oracle for a decoded member: PIL's decoder, converted to RGB."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sample(key, caption="a caption", image=None, suffix="jpg", extra=True):
    """img2dataset's members of one sample, in its order: image, caption, metadata."""
    members = []
    if image is not False:
        members.append((f"{key}.{suffix}", image if image is not None else _image_bytes(RED)))
    if caption is not None:
        members.append((f"{key}.txt", caption if isinstance(caption, bytes) else caption.encode()))
    if extra:
        meta = {"url": f"http://x/{key}", "key": key, "status": "success", "width": 8,
                "height": 8}
        members.append((f"{key}.json", json.dumps(meta).encode()))
    return members


def _write_shard(folder, shard_id, samples, cut=None):
    """``{shard_id:05d}.tar`` (+ img2dataset's .parquet / _stats.json neighbours, which the
    reader must not take for shards); ``cut`` truncates the tar to that many bytes."""
    data = _tar_bytes([m for s in samples for m in s])
    path = os.path.join(folder, f"{shard_id:05d}.tar")
    with open(path, "wb") as f:
        f.write(data if cut is None else data[:cut])
    with open(os.path.join(folder, f"{shard_id:05d}.parquet"), "wb") as f:
        f.write(b"PAR1 not read")
    with open(os.path.join(folder, f"{shard_id:05d}_stats.json"), "w") as f:
        json.dump({"count": len(samples)}, f)
    return path


def _member_offsets(samples):
    """Offset of each member's header in the tar ``_tar_bytes`` writes (512-byte header,
    data padded to 512): for cutting a shard at a chosen place."""
    offsets, pos = [], 0
    for name, data in (m for s in samples for m in s):
        offsets.append((name, pos))
        pos += 512 + -(-len(data) // 512) * 512
    return dict(offsets)


def _corpus(folder, num_shards, per_shard):
    """Shards of good samples keyed "{shard:05d}{index:04d}" (img2dataset's key scheme)."""
    keys = []
    for s in range(num_shards):
        samples = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            samples.append(_sample(key, caption=f"caption {key}"))
            keys.append(key)
        _write_shard(folder, s, samples)
    return keys


def _ids(records):
    return [r["image_id"] for r in records]


def _warnings(caplog):
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ------------------------------------------------------------------- path patterns
def test_expand_paths_brace_range_and_glob(tmp_path):
    """webdataset's brace ranges keep zero padding: {00008..00011} -> 00008 ... 00011
    (4 names, listed without touching the disk); a glob lists the .tar files only."""
    assert expand_paths(str(tmp_path / "{00008..00011}.tar")) == [
        str(tmp_path / f"{i:05d}.tar") for i in (8, 9, 10, 11)]
    assert expand_paths(["a/{1..2}/{0..1}.txt"]) == [
        "a/1/0.txt", "a/1/1.txt", "a/2/0.txt", "a/2/1.txt"]
    for i in (2, 0, 1):
        _write_shard(str(tmp_path), i, [_sample("k")])
    assert expand_paths(str(tmp_path / "*.tar")) == [
        str(tmp_path / f"{i:05d}.tar") for i in (0, 1, 2)]
    with pytest.raises(FileNotFoundError):
        expand_paths(str(tmp_path / "*.nothing"))


def test_stream_partition_hand_worked():
    """5 files over 4 readers: file i -> reader i % 4, so reader 0 gets files 0 and 4;
    3 files over 4 readers: every reader opens all 3 and keeps samples r % 4 == slot."""
    assert [stream_partition(5, s, 4)[0] for s in range(4)] == [[0, 4], [1], [2], [3]]
    assert all(stream_partition(5, s, 4)[1] is None for s in range(4))
    assert stream_partition(3, 2, 4) == ([0, 1, 2], (2, 4))
    assert stream_partition(5, 1, 4, split_by="sample") == ([0, 1, 2, 3, 4], (1, 4))
    assert stream_partition(3, 1, 4, split_by="file") == ([1], None)


# --------------------------------------------------------------------- WebDataset
def test_webdataset_yields_exact_records(tmp_path):
    """Keys, captions (stripped .txt) and pixels (PIL's decoding of the bytes written, RGB
    order: the red-dominant JPEG stays red-dominant) of a shard, a PNG member included;
    the .json member is not needed, the .parquet / _stats.json neighbours are not read."""
    red, blue, png = _image_bytes(RED), _image_bytes(BLUE), _image_bytes(BLUE, "PNG")
    samples = [_sample("000000000", "a red square\n", red),
               _sample("000000001", "  a blue one ", blue, extra=False),
               _sample("000000002", "lossless", png, suffix="png")]
    _write_shard(str(tmp_path), 0, samples)
    stream = WebDatasetPairs(str(tmp_path / "*.tar"))
    records = list(stream)
    assert _ids(records) == ["000000000", "000000001", "000000002"]
    assert [r["captions"] for r in records] == [["a red square"], ["a blue one"], ["lossless"]]
    for record, data in zip(records, (red, blue, png)):
        assert record["image"].dtype == np.uint8 and record["image"].shape == (8, 8, 3)
        assert np.array_equal(record["image"], _pil_rgb(data))
    # RGB, not BGR: the bottom-right quadrant of the first image was painted RED.
    r, g, b = records[0]["image"][6, 6].astype(int)
    assert r > 200 and g < 60 and b < 60
    # The PNG is lossless: its pixels are exactly the ones painted.
    assert tuple(records[2]["image"][6, 6]) == BLUE
    assert tuple(records[2]["image"][0, 0]) == (255 - BLUE[0], 255 - BLUE[1], 255 - BLUE[2])
    assert sum(stream.skipped.values()) == 0
    # A second pass reads the shards again.
    assert _ids(list(stream)) == _ids(records)


def test_webdataset_bad_members_skipped_with_warning_and_counted(tmp_path, caplog):
    """Each bad sample is skipped, one reason each, counted exactly (hand count below),
    and named in a warning; the good samples around them come out unchanged."""
    good = _image_bytes(RED)
    samples = [
        _sample("k0", "good 0", good),
        _sample("k1", "garbage image", b"not a jpeg at all"),           # undecodable_image
        _sample("k2", "truncated jpeg", good[: len(good) // 2]),         # undecodable_image
        _sample("k3", None, good),                                       # missing_caption
        _sample("k4", " \t\n", good),                                    # empty_caption
        _sample("k5", "no image", image=False),                          # missing_image
        _sample("k6", b"\xff\xfe bad utf-8 \xc3", good),                 # undecodable_caption
        _sample("k7", "good 7", good),
    ]
    _write_shard(str(tmp_path), 0, samples)
    stream = WebDatasetPairs([str(tmp_path / "00000.tar")], name="bad_members")
    with caplog.at_level(logging.WARNING):
        records = list(stream)
    assert _ids(records) == ["k0", "k7"]
    assert [r["captions"] for r in records] == [["good 0"], ["good 7"]]
    assert stream.skipped == collections.Counter(
        undecodable_image=2, missing_caption=1, empty_caption=1, missing_image=1,
        undecodable_caption=1)
    text = _warnings(caplog)
    for key in ("k1", "k2", "k3", "k4", "k5", "k6"):
        assert f"'{key}'" in text, key
    assert "bad_members: skipped 6 record(s)" in text


def test_webdataset_truncated_and_unreadable_shards_are_counted(tmp_path, caplog):
    """A shard cut short keeps the samples completed before the cut (the sample being read
    is lost with the rest) and counts once as truncated_or_corrupt_tar, wherever the cut
    falls: inside a member's data (tarfile raises), exactly at a member boundary or inside
    a header (tarfile ends silently: no end-of-archive blocks). The next shard is read."""
    samples = [_sample(f"a{i}", f"cap {i}") for i in range(3)]
    offsets = _member_offsets(samples)
    cuts = {
        "in_data": offsets["a2.jpg"] + 512 + 100,  # 100 bytes into a2.jpg's data
        "boundary": offsets["a2.jpg"],             # right before a2.jpg's header
        "in_header": offsets["a2.txt"] + 100,      # inside a2.txt's header
    }
    folder = str(tmp_path)
    _write_shard(folder, 0, samples, cut=cuts["in_data"])
    _write_shard(folder, 1, samples, cut=cuts["boundary"])
    _write_shard(folder, 2, samples, cut=cuts["in_header"])
    _write_shard(folder, 3, [_sample("b0", "after")])
    with open(os.path.join(folder, "00004.tar"), "wb") as f:
        f.write(b"\x00" * 100)  # not a tar (an empty download)
    stream = WebDatasetPairs(expand_paths(os.path.join(folder, "*.tar"))
                             + [os.path.join(folder, "missing.tar")], name="cut")
    with caplog.at_level(logging.WARNING):
        records = list(stream)
    # in_data: a0, a1 complete (a2 cut); boundary: a0 (a1 was being read when the stream
    # ended); in_header: a0, a1 (a2.jpg complete but a2 unfinished); then b0.
    assert _ids(records) == ["a0", "a1", "a0", "a0", "a1", "b0"]
    assert stream.skipped == collections.Counter(truncated_or_corrupt_tar=4,
                                                 unreadable_shard=1)
    assert "missing.tar" in _warnings(caplog) and "00001.tar" in _warnings(caplog)


def test_webdataset_gzipped_shard(tmp_path):
    """A .tar.gz shard (tarfile's stream mode with gzip) reads like the plain tar."""
    import gzip

    data = _tar_bytes(_sample("g0", "zipped") + _sample("g1", "too"))
    path = tmp_path / "00000.tar.gz"
    path.write_bytes(gzip.compress(data))
    stream = WebDatasetPairs(str(path))
    assert [(r["image_id"], r["captions"]) for r in stream] == [("g0", ["zipped"]),
                                                                ("g1", ["too"])]
    path.write_bytes(gzip.compress(data)[:-30])  # gzip cut short: EOFError inside
    stream = WebDatasetPairs(str(path))
    assert _ids(list(stream)) == ["g0"] and stream.skipped["truncated_or_corrupt_tar"] == 1


def _identity(x):
    return x


def _read_ranks(stream_cls, files, world_size=2, num_workers=2, **kwargs):
    """{rank: ids read by its DataLoader (num_workers processes)}, as each rank would."""
    out = {}
    for rank in range(world_size):
        stream = stream_cls(files, rank=rank, world_size=world_size, **kwargs)
        loader = torchdata.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                      collate_fn=_identity)
        out[rank] = [r.get("image_id", r.get("text")) for r in loader]
    return out


@pytest.mark.parametrize("num_shards", [5, 2])
def test_webdataset_two_ranks_two_workers_cover_every_sample_once(tmp_path, num_shards):
    """2 ranks x 2 DataLoader workers = 4 readers, reader = rank * 2 + worker.
    5 shards (by file): rank 0 = readers 0, 1 = shards {0, 4} + {1}; rank 1 = shards 2, 3.
    2 shards (by sample, 3 each = 6 samples, running index r): rank 0 = r % 4 in {0, 1}
    = samples 0, 1, 4, 5; rank 1 = samples 2, 3."""
    keys = _corpus(str(tmp_path), num_shards, 3)
    out = _read_ranks(WebDatasetPairs, str(tmp_path / "*.tar"))
    assert sorted(out[0] + out[1]) == sorted(keys)  # every sample exactly once
    if num_shards == 5:
        shard_of = {k: int(k[:5]) for k in keys}
        assert sorted({shard_of[k] for k in out[0]}) == [0, 1, 4]
        assert sorted({shard_of[k] for k in out[1]}) == [2, 3]
    else:
        assert sorted(out[0]) == [keys[i] for i in (0, 1, 4, 5)]
        assert sorted(out[1]) == [keys[i] for i in (2, 3)]


def test_shuffled_shards_still_split_exactly(tmp_path):
    """With shard shuffling, each epoch's order is the same on every reader (seeded by
    epoch), so 4 readers still partition the corpus; and epochs differ in order."""
    keys = _corpus(str(tmp_path), 8, 1)
    orders = []
    for epoch in (0, 1):
        per_reader = []
        for rank in range(4):
            stream = WebDatasetPairs(str(tmp_path / "*.tar"), shuffle=True, seed=5,
                                     rank=rank, world_size=4)
            stream.set_epoch(epoch)
            per_reader.append(_ids(stream))
        assert sorted(sum(per_reader, [])) == keys
        orders.append(per_reader)
    assert orders[0] != orders[1]


def test_sample_split_counts_each_bad_sample_once(tmp_path):
    """One shard, 4 readers by sample: the bad sample (running index 2) is counted by
    reader 2 only, and the truncation (at the sample with index 5: 5 % 4 = reader 1)
    once, by reader 1."""
    samples = [_sample(f"s{i}", f"c{i}") for i in range(6)]
    samples[2] = _sample("s2", "   ")  # empty caption
    offsets = _member_offsets(samples)
    _write_shard(str(tmp_path), 0, samples, cut=offsets["s5.txt"] + 10)
    counts, ids = [], []
    for rank in range(4):
        stream = WebDatasetPairs(str(tmp_path / "00000.tar"), rank=rank, world_size=4)
        ids += _ids(stream)
        counts.append(dict(stream.skipped))
    assert sorted(ids) == ["s0", "s1", "s3", "s4"]
    assert counts == [{}, {"truncated_or_corrupt_tar": 1}, {"empty_caption": 1}, {}]


def test_register_webdataset_pairs_is_lazy_and_streamed(tmp_path):
    """Registration reads nothing (the shards need not exist yet); DatasetCatalog.get
    returns the stream; re-registering the same shards is a no-op, other shards replace."""
    name = f"pairs_{uuid.uuid4().hex[:8]}"
    pattern = str(tmp_path / "{00000..00001}.tar")
    try:
        register_webdataset_pairs(name, pattern, task="captioning")
        meta = MetadataCatalog.get(name)
        assert (meta.task, meta.evaluator_type, meta.streamed, meta.shards) == (
            "captioning", "captioning", True, pattern)
        register_webdataset_pairs(name, pattern, task="captioning")
        keys = _corpus(str(tmp_path), 2, 2)
        stream = DatasetCatalog.get(name)
        assert isinstance(stream, WebDatasetPairs) and isinstance(stream,
                                                                  torchdata.IterableDataset)
        assert _ids(stream) == keys
        register_webdataset_pairs(name, [str(tmp_path / "00001.tar")], task="retrieval")
        assert MetadataCatalog.get(name).task == "retrieval"
        assert _ids(DatasetCatalog.get(name)) == keys[2:]
        # Other stream options are another registration too.
        register_webdataset_pairs(name, [str(tmp_path / "00001.tar")], task="retrieval",
                                  split_by="sample")
        assert MetadataCatalog.get(name).stream_options == {"split_by": "sample"}
        assert DatasetCatalog.get(name).split_by == "sample"
        with pytest.raises(ValueError, match="task must be one of"):
            register_webdataset_pairs(name + "_x", pattern, task="detection")
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# --------------------------------------------------------------------- text corpus
def _text_files(folder):
    (folder / "books.txt").write_bytes(
        b"First sentence of a book.\n\n   \n  Second, indented.  \nThird\r\n")
    (folder / "wiki.txt").write_bytes(
        b"Wiki paragraph one.\n\xff\xfe not utf-8\n\n" + "Caf\u00e9 au lait.".encode()
        + b"\nno final newline")
    return [str(folder / "books.txt"), str(folder / "wiki.txt")]


def test_text_corpus_yields_stripped_lines_and_counts_bad_ones(tmp_path, caplog):
    """Blank / whitespace-only lines are skipped without counting (paragraph breaks), a
    line that is not UTF-8 is skipped with a warning and counted."""
    files = _text_files(tmp_path)
    corpus = TextCorpus(files, name="books")
    with caplog.at_level(logging.WARNING):
        texts = [r["text"] for r in corpus]
    assert texts == ["First sentence of a book.", "Second, indented.", "Third",
                     "Wiki paragraph one.", "Caf\u00e9 au lait.", "no final newline"]
    assert corpus.skipped == collections.Counter(undecodable_line=1)
    assert "wiki.txt:2" in _warnings(caplog)


def test_text_corpus_two_ranks_two_workers_cover_every_line_once(tmp_path):
    """2 files < 4 readers: split by line. The 7 non-blank lines have running indices
    0..6 (the bad one is index 4); rank 0 (readers 0, 1) keeps indices 0, 1, 4, 5 =
    lines 1, 2 of books, the bad line (dropped) and the cafe line; rank 1 the others."""
    files = _text_files(tmp_path)
    out = _read_ranks(TextCorpus, files)
    assert sorted(out[0]) == sorted(["First sentence of a book.", "Second, indented.",
                                     "Caf\u00e9 au lait."])
    assert sorted(out[1]) == sorted(["Third", "Wiki paragraph one.", "no final newline"])


def test_register_text_corpus(tmp_path):
    files = _text_files(tmp_path)
    name = f"text_{uuid.uuid4().hex[:8]}"
    try:
        register_text_corpus(name, str(tmp_path / "*.txt"))
        meta = MetadataCatalog.get(name)
        assert (meta.task, meta.evaluator_type, meta.streamed) == ("mlm", "mlm", True)
        corpus = DatasetCatalog.get(name)
        assert isinstance(corpus, TextCorpus)
        assert [r["text"] for r in corpus] == [r["text"] for r in TextCorpus(files)]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
