"""Image-text retrieval in the unified formulation (Uni-Perceiver v2, Sec. 4.3): the image is
[<SPE>, global tokens, regional tokens] through g, the caption is [<SPE>, f_text(caption)]
through g with the routing attribute TARGET set (the caption is the image's target), and
the two <SPE> outputs are compared by a temperature-scaled cosine (Eq. 5). The loss is the
symmetric InfoNCE over the batch, image-to-text and text-to-image, each a cross-entropy with
label smoothing and each weighted (Eq. 7; Uni-Perceiver v1's retrieval losses, w = 0.5,
epsilon = 0.1). With MODEL.RETRIEVAL.GATHER_FEATURES the features of every process are
negatives too ("Gather Feature", Uni-Perceiver v2, Table 4).
"""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.nn import functional as F

from detectron2.utils import comm

from ...data.dataset_mappers import ImageTextDatasetMapper
from ...evaluation import RetrievalEvaluator
from .base import Task, register_task
from .detection import LogitScale

__all__ = ["RetrievalTask", "contrastive_losses"]


def contrastive_losses(image_feats: torch.Tensor, text_feats: torch.Tensor,
                       scale: torch.Tensor, label_smoothing: float = 0.0,
                       gather: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of B matched (image, caption) pairs: pair i is the positive of row i
    and every other caption (image) of the batch a negative.

    Args:
        image_feats: (B, D) image features (any norm: they are L2-normalised here).
        text_feats: (B, D) caption features, row i the caption of image i.
        scale: () the logit scale 1/tau.
        label_smoothing: epsilon of both cross-entropies, (1 - eps) NLL + eps x the mean over
            the N candidates of -log p.
        gather: with torch.distributed initialised and world size W > 1, all-gather both
            sides from every process (each must hold B pairs) so the candidates are the
            N = W x B pairs of the global batch, process r's pairs at rows [r B, (r + 1) B).
            Each process scores its own B queries against all N candidates (logits (B, N),
            positives on the global diagonal) and returns the mean over its B queries; the
            gather is torch.distributed.nn's, whose backward sums the gradients of every
            process's loss into the local features. So the mean of the processes' losses is
            the InfoNCE of the global batch, and DDP's average of the processes' gradients is
            exactly its gradient. Otherwise (or world size 1): in-batch candidates, N = B.
    Returns:
        (loss_i2t, loss_t2i): unweighted () cross-entropies of the image queries against the
        captions and of the caption queries against the images.
    """
    if image_feats.dim() != 2 or image_feats.shape != text_feats.shape:
        raise ValueError(f"contrastive_losses: image features {tuple(image_feats.shape)} and "
                         f"text features {tuple(text_feats.shape)} must both be (B, D)")
    if image_feats.shape[0] == 0:
        raise ValueError("contrastive_losses: the batch is empty")
    img = F.normalize(image_feats.float(), dim=-1)
    txt = F.normalize(text_feats.float(), dim=-1)
    b = img.shape[0]
    rank, world = comm.get_rank(), comm.get_world_size()
    all_img, all_txt, offset = img, txt, 0
    if gather and world > 1:
        from torch.distributed.nn.functional import all_gather

        # all_gather needs one shape on every process: say which process differs rather
        # than fail inside the collective
        sizes = [torch.zeros(1, dtype=torch.long, device=img.device) for _ in range(world)]
        dist.all_gather(sizes, torch.full((1,), b, dtype=torch.long, device=img.device))
        sizes = [int(s) for s in sizes]
        if len(set(sizes)) != 1:
            raise ValueError(f"contrastive_losses: gathering features needs the same batch size "
                             f"on every process, got {sizes} (process rank: size)")
        all_img = torch.cat(all_gather(img), dim=0)                          # (N, D)
        all_txt = torch.cat(all_gather(txt), dim=0)                          # (N, D)
        offset = rank * b
    labels = torch.arange(offset, offset + b, device=img.device)
    # float32 even under autocast: the loss compares cosines that differ in the third digit
    with torch.autocast(device_type=img.device.type, enabled=False):
        scale = scale.float()
        logits_i2t = scale * img @ all_txt.T                                 # (B, N)
        logits_t2i = scale * txt @ all_img.T                                 # (B, N)
        return (F.cross_entropy(logits_i2t, labels, label_smoothing=label_smoothing),
                F.cross_entropy(logits_t2i, labels, label_smoothing=label_smoothing))


def _captions_of(batched_inputs: Sequence[Dict], key: str) -> List:
    """Each input's ``key`` ("caption": a string; "captions": a non-empty list of strings),
    a ValueError naming the first input without one."""
    found = []
    for i, x in enumerate(batched_inputs):
        value = x.get(key)
        ok = (isinstance(value, str) and value.strip() if key == "caption" else
              isinstance(value, (list, tuple)) and value
              and all(isinstance(c, str) and c.strip() for c in value))
        if not ok:
            want = "a non-empty string" if key == "caption" else "a non-empty list of strings"
            raise ValueError(f"retrieval: input {i} (file_name {x.get('file_name')!r}, "
                             f"image_id {x.get('image_id')!r}) needs {key!r}, {want}, got "
                             f"{value!r} (ImageTextDatasetMapper gives both)")
        found.append(value)
    return found


@register_task
class RetrievalTask(Task):
    """Targets: each image's caption, encoded afresh in every batch (not through the
    TargetBank's cache: the captions change with the batch). Temperature: its own learnable
    scale. Losses ``loss_i2t`` and ``loss_t2i`` = MODEL.RETRIEVAL.LOSS_WEIGHT x the
    cross-entropies of `contrastive_losses` with MODEL.RETRIEVAL.LABEL_SMOOTHING, over the
    global batch with MODEL.RETRIEVAL.GATHER_FEATURES.

    Inputs: {"image", "caption" (training), "captions" (inference), "image_id"} from
    `ImageTextDatasetMapper` at MODEL.RETRIEVAL.IMAGE_SIZE. Outputs, per image:
    {"image_embedding": (D,), "caption_embeddings": (n_i, D), both L2-normalised, D = g's
    width, "image_id"}.

    With GATHER_FEATURES and several processes, every process must run a retrieval batch in
    the same iteration (the gather is a collective), as in single-task training.
    """

    name = "retrieval"

    @classmethod
    def task_weight(cls, cfg) -> float:
        """Both directions' weights: the task's loss is LOSS_WEIGHT x (i2t + t2i)."""
        return 2.0 * float(cfg.MODEL.RETRIEVAL.LOSS_WEIGHT)

    def __init__(self, cfg):
        super().__init__()
        c = cfg.MODEL.RETRIEVAL
        self.logit_scale = LogitScale()
        self.loss_weight = c.LOSS_WEIGHT
        self.label_smoothing = c.LABEL_SMOOTHING
        self.gather_features = c.GATHER_FEATURES

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_dir: str):
        return RetrievalEvaluator(dataset_name)

    @classmethod
    def build_dataset_mapper(cls, cfg, is_train: bool):
        return ImageTextDatasetMapper(cfg, is_train=is_train,
                                      image_size=cfg.MODEL.RETRIEVAL.IMAGE_SIZE)

    def losses(self, model, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        captions = _captions_of(batched_inputs, "caption")
        img = model.image_spe(batched_inputs)
        txt = model.encode_targets(captions)          # each caption a target (TARGET on)
        i2t, t2i = contrastive_losses(img, txt, self.logit_scale(), self.label_smoothing,
                                      gather=self.gather_features)
        return {"loss_i2t": self.loss_weight * i2t, "loss_t2i": self.loss_weight * t2i}

    @staticmethod
    def embed_images(model, batched_inputs: List[Dict]) -> torch.Tensor:
        """(B, D) float32, L2-normalised: each image's <SPE> output of g."""
        return F.normalize(model.image_spe(batched_inputs).float(), dim=-1)

    @staticmethod
    def embed_texts(model, texts: List[str]) -> torch.Tensor:
        """(N, D) float32, L2-normalised: each text as a target, [<SPE>, f_text(text)]
        through g; its dot product with `embed_images`' rows ranks images for the text."""
        return F.normalize(model.encode_targets(list(texts)).float(), dim=-1)

    def inference(self, model, batched_inputs: List[Dict]) -> List[Dict]:
        captions = _captions_of(batched_inputs, "captions")
        img = self.embed_images(model, batched_inputs)
        # every caption of the batch in one pass through f_text and g, then split per image
        txt = self.embed_texts(model, [c for caps in captions for c in caps])
        per_image = torch.split(txt, [len(caps) for caps in captions])
        return [{"image_embedding": e, "caption_embeddings": t, "image_id": x.get("image_id")}
                for e, t, x in zip(img, per_image, batched_inputs)]
