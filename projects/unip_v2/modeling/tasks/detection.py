"""Detection and instance segmentation in the unified formulation ("Tasks with
Localization"): each general region proposal's decoded feature is compared with every class
embedding (Eq. 5); the class loss is cross-entropy over the category set (Eq. 7) on the
proposals matched to ground truth; a prediction's score is objectness x class probability.
"""
import math
from typing import List, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LogitScale", "class_logits", "matched_class_loss", "detection_topk"]


class LogitScale(nn.Module):
    """The learnable 1/tau of Eq. 5, one per task family: stored as a log, initialised to
    1/0.07 (CLIP's initial temperature), used clamped at 100 so training cannot blow it up."""

    def __init__(self, init: float = 1 / 0.07, max_scale: float = 100.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)))
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)


def check_class_names(names: Sequence[str]) -> List[str]:
    """The category names of a vocabulary, stripped; a ValueError names an empty entry or
    the repeated ones (a repeated name would split one category's probability in two)."""
    names = [n.strip() if isinstance(n, str) else n for n in names]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"the vocabulary must be a non-empty list of non-empty names, "
                         f"got {names!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"the vocabulary's names repeat: {repeated}")
    return names


def class_logits(features: torch.Tensor, class_embeddings: torch.Tensor,
                 scale: torch.Tensor) -> torch.Tensor:
    """scale * cos(features, class embeddings).

    Args:
        features: (B, O, D) decoded regional tokens; class_embeddings: (C, D).
    Returns:
        (B, O, C) logits.
    """
    if features.shape[-1] != class_embeddings.shape[-1] or class_embeddings.dim() != 2:
        raise ValueError(f"class_logits: features {tuple(features.shape)} and class embeddings "
                         f"{tuple(class_embeddings.shape)} must share the last dimension D")
    return scale * F.normalize(features, dim=-1) @ F.normalize(class_embeddings, dim=-1).T


def matched_class_loss(logits: torch.Tensor, proposal_query_index: torch.Tensor,
                       matches: List[Tuple[torch.Tensor, torch.Tensor]],
                       gt_classes: List[torch.Tensor]) -> torch.Tensor:
    """Eq. 7 on the proposals matched to ground truth.

    Args:
        logits: (B, O, C) class logits of the top-O proposals.
        proposal_query_index: (B, O) which decoder query each proposal is.
        matches: per image (query indices, gt indices), the class-agnostic Hungarian
            assignment of the decoder's final layer.
        gt_classes: per image (T,) int64 category index in [0, C).
    Returns:
        mean cross-entropy over matched proposals that made the top O (unmatched proposals
        get no class loss: their objectness already says "background"); 0 (still attached
        to the graph) when there are none.
    """
    B, O, C = logits.shape
    rows, targets = [], []
    for b, (q, g) in enumerate(matches):
        if len(q) == 0:
            continue
        q = q.to(proposal_query_index.device)
        # position of each matched query among the top-O proposals (-1 if it did not make it)
        hit = proposal_query_index[b][None, :] == q[:, None]        # (m, O)
        kept = hit.any(1)
        if not kept.any():
            continue
        pos = hit.float().argmax(1)[kept]
        rows.append(logits[b, pos])
        targets.append(gt_classes[b].to(logits.device)[g.to(logits.device)[kept]])
    if not rows:
        return logits.sum() * 0.0
    target = torch.cat(targets)
    if int(target.min()) < 0 or int(target.max()) >= C:
        raise ValueError(f"matched_class_loss: ground-truth classes must lie in [0, {C}), got "
                         f"{target.min().item()}..{target.max().item()}")
    return F.cross_entropy(torch.cat(rows).float(), target)


def detection_topk(objectness_logits: torch.Tensor, class_logits_: torch.Tensor, k: int):
    """Top k (proposal, class) pairs of one image by objectness x class probability.

    Args:
        objectness_logits: (O,); class_logits_: (O, C).
    Returns:
        scores (k',), proposal indices (k',), class indices (k',) with k' = min(k, O * C),
        sorted by score, highest first. A proposal may appear with several classes.
    """
    scores = objectness_logits.sigmoid()[:, None] * class_logits_.softmax(-1)   # (O, C)
    C = scores.shape[1]
    top = scores.flatten().topk(min(k, scores.numel()))
    return top.values, torch.div(top.indices, C, rounding_mode="floor"), top.indices % C
