"""Recall@K of image-text retrieval (Uni-Perceiver v2, Sec. 4.3; the official Uni-Perceiver
retrieval evaluation), over every process's embeddings."""
import itertools
import logging
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import torch

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["RetrievalEvaluator", "retrieval_ranks", "retrieval_recalls"]

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
# images per similarity block: the (chunk, captions) block stays small at COCO's 5k x 25k
_CHUNK = 1024


def retrieval_ranks(image_embeddings: torch.Tensor, caption_embeddings: torch.Tensor,
                    caption_owner: torch.Tensor, chunk: int = _CHUNK
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ranks of the positives under cosine similarity, 0 = first.

    Args:
        image_embeddings: (N, D); caption_embeddings: (M, D) (normalised here).
        caption_owner: (M,) int64, the index in [0, N) of each caption's image.
        chunk: images per block of the (N, M) similarity matrix.
    Returns:
        i2t (N,): for image i, how many captions of OTHER images score at least as high as
            its best-scoring caption (so it is found at K iff rank < K);
        t2i (M,): for caption c, how many OTHER images score at least as high as its image.
        A tie counts against the query: a model that maps everything to one point ranks
        every positive last, not first.
    """
    n, m = image_embeddings.shape[0], caption_embeddings.shape[0]
    if caption_owner.shape != (m,):
        raise ValueError(f"retrieval_ranks: {m} captions but owner shape "
                         f"{tuple(caption_owner.shape)}")
    if m and (int(caption_owner.min()) < 0 or int(caption_owner.max()) >= n):
        raise ValueError(f"retrieval_ranks: caption owners must lie in [0, {n})")
    img = torch.nn.functional.normalize(image_embeddings.float(), dim=-1)
    txt = torch.nn.functional.normalize(caption_embeddings.float(), dim=-1)
    owner = caption_owner.long()
    # Pass 1: each caption's score with its own image, read from the same matmul blocks as
    # pass 2 compares against, so equal embeddings give bitwise equal scores.
    positive = torch.empty(m)
    i2t = torch.empty(n, dtype=torch.long)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n))
        sim = img[rows] @ txt.T                                              # (n_c, M)
        mine = owner[None, :] == rows[:, None]                               # (n_c, M)
        in_block = (owner >= start) & (owner < start + len(rows))
        positive[in_block] = sim[owner[in_block] - start, in_block.nonzero()[:, 0]]
        best = sim.masked_fill(~mine, float("-inf")).amax(dim=1)            # (n_c,)
        i2t[rows] = ((sim >= best[:, None]) & ~mine).sum(dim=1)
    # Pass 2: per caption, the other images scoring at least its positive.
    t2i = torch.zeros(m, dtype=torch.long)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n))
        sim = img[rows] @ txt.T
        t2i += ((sim >= positive[None, :]) & (owner[None, :] != rows[:, None])).sum(dim=0)
    return i2t, t2i


def retrieval_recalls(i2t_ranks: torch.Tensor, t2i_ranks: torch.Tensor,
                      ks: Sequence[int] = RECALL_KS) -> "OrderedDict[str, float]":
    """Recall@K in percent of both directions and their means: i2t_R{k}, t2i_R{k},
    mean_R{k} (the mean of the two directions) and mean_recall (of all 2 x len(ks))."""
    out = OrderedDict()
    for direction, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            out[f"{direction}_R{k}"] = 100.0 * (ranks < k).double().mean().item()
    for k in ks:
        out[f"mean_R{k}"] = (out[f"i2t_R{k}"] + out[f"t2i_R{k}"]) / 2
    out["mean_recall"] = sum(out[f"{d}_R{k}"] for d in ("i2t", "t2i") for k in ks) / (2 * len(ks))
    # the acceptance numbers first (results tables show the first few)
    first = ["mean_R1", "i2t_R1", "t2i_R1", "mean_recall"]
    return OrderedDict((key, out[key]) for key in first + [k for k in out if k not in first])


class RetrievalEvaluator(DatasetEvaluator):
    """Reads each output's "image_embedding" (D,), "caption_embeddings" (n_i, D) and
    "image_id"; ranks every caption of the dataset for each image and every image for each
    caption by cosine similarity (`retrieval_ranks`: an image is found at K when any of its
    captions is among the K best) and returns {"retrieval": `retrieval_recalls`} in percent.
    Images the test loader left out are not counted; an image_id seen twice is an error (its
    captions would be counted twice)."""

    def __init__(self, dataset_name: str, distributed: bool = True):
        self.dataset_name = dataset_name
        self.distributed = distributed
        self.reset()

    def reset(self):
        self._items: List[Tuple[object, torch.Tensor, torch.Tensor]] = []

    def process(self, inputs: List[Dict], outputs: List[Dict]):
        for y in outputs:
            image = y["image_embedding"].detach().float().cpu()
            captions = y["caption_embeddings"].detach().float().cpu()
            if image.dim() != 1 or captions.dim() != 2 or captions.shape[1] != image.shape[0] \
                    or captions.shape[0] == 0:
                raise ValueError(f"{self.dataset_name}: image {y.get('image_id')!r} needs an "
                                 f"image embedding (D,) and caption embeddings (n >= 1, D), got "
                                 f"{tuple(image.shape)} and {tuple(captions.shape)}")
            self._items.append((y.get("image_id"), image, captions))

    def evaluate(self):
        items = self._items
        if self.distributed:
            comm.synchronize()
            items = list(itertools.chain(*comm.gather(items, dst=0)))
            if not comm.is_main_process():
                return {}
        if not items:
            logger.warning(f"{self.dataset_name}: no predictions to evaluate")
            return {"retrieval": retrieval_recalls(torch.zeros(0), torch.zeros(0))}
        ids = [i for i, _, _ in items if i is not None]
        if len(set(ids)) != len(ids):
            repeated = sorted({i for i in ids if ids.count(i) > 1}, key=str)[:5]
            raise ValueError(f"{self.dataset_name}: image_id(s) {repeated} evaluated more than "
                             f"once")
        images = torch.stack([e for _, e, _ in items])                       # (N, D)
        captions = torch.cat([c for _, _, c in items])                       # (M, D)
        owner = torch.repeat_interleave(torch.arange(len(items)),
                                        torch.tensor([c.shape[0] for _, _, c in items]))
        result = retrieval_recalls(*retrieval_ranks(images, captions, owner))
        logger.info(f"{self.dataset_name}: {len(items)} images, {len(captions)} captions, "
                    + ", ".join(f"{k} {v:.2f}" for k, v in result.items()))
        return OrderedDict(retrieval=result)
