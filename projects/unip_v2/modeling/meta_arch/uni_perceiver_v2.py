"""`UniPerceiverV2`: the generalist. One image encoder f_image, one text encoder f_text, one
unified decoder g and the TargetBank, shared by the tasks of MODEL.TASKS (Uni-Perceiver v2,
Sec. 4; `modeling/tasks/`). Each batch holds one task and goes to that task, which builds its
sequences from the shared parts, compares decoded inputs with decoded targets (Eq. 5-7) and
returns its losses (training) or its outputs (inference).
"""
from typing import Dict, List

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from ...data.datasets.metadata import dataset_task
from ..image_encoder import ImageEncoder, ImageEncoderOutput, ImagePreprocessor
from ..target_bank import TargetBank
from ..tasks import build_tasks, evaluator_for_dataset, task_of_batch
from ..text_encoder import TextEncoder
from ..unified_decoder import Segment, SegmentKind, UnifiedDecoder

__all__ = ["UniPerceiverV2"]

# state-dict keys renamed by the task interface: old name -> new name (old checkpoints load)
_RENAMED_KEYS = {"logit_scale.log_scale": "tasks.detection.logit_scale.log_scale"}


@META_ARCH_REGISTRY.register()
class UniPerceiverV2(nn.Module):
    """Inputs: detectron2's list of dicts, each with the fields its task reads and
    ``"task"`` (the loaders add it from the dataset's metadata; optional when the model has
    one task). Images: "image" uint8 (3, H, W) (see `ImagePreprocessor`)."""

    @configurable
    def __init__(self, *, image_encoder: ImageEncoder, text_encoder: TextEncoder,
                 unified_decoder: UnifiedDecoder, tasks: nn.ModuleDict,
                 preprocessor: ImagePreprocessor):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.unified_decoder = unified_decoder
        self.target_bank = TargetBank(self.encode_targets, self.encode_tokens,
                                      len(text_encoder.tokenizer))
        self.tasks = tasks
        self.preprocessor = preprocessor
        self._register_load_state_dict_pre_hook(_rename_old_keys)

    @classmethod
    def from_config(cls, cfg):
        width = cfg.MODEL.UNIFIED_DECODER.WIDTH
        for key, value in (("MODEL.IMAGE_ENCODER.OUTPUT_DIM", cfg.MODEL.IMAGE_ENCODER.OUTPUT_DIM),
                           ("MODEL.TEXT_ENCODER.OUTPUT_DIM", cfg.MODEL.TEXT_ENCODER.OUTPUT_DIM)):
            if value != width:
                raise ValueError(f"{key}={value} must equal MODEL.UNIFIED_DECODER.WIDTH={width}: "
                                 "image and text tokens enter the same decoder")
        image_encoder = ImageEncoder(cfg)
        return {
            "image_encoder": image_encoder,
            "text_encoder": TextEncoder(cfg),
            "unified_decoder": UnifiedDecoder(cfg),
            "tasks": build_tasks(cfg),
            "preprocessor": ImagePreprocessor(
                cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD,
                max(cfg.MODEL.IMAGE_ENCODER.SIZE_DIVISIBILITY,
                    image_encoder.backbone.size_divisibility), cfg.INPUT.FORMAT),
        }

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_dir: str):
        """The evaluator of the task that the dataset's metadata names."""
        return evaluator_for_dataset(cfg, dataset_name, output_dir)

    @property
    def device(self):
        return self.preprocessor.device

    def lr_multiplier_modules(self, cfg):
        """(module, learning-rate multiplier) pairs for the optimiser, most specific first
        (solver/build.py): the pretrained encoders move slowly (Sec. 5.2); g and the tasks
        train at the base rate."""
        return [(self.image_encoder.backbone, cfg.SOLVER.BACKBONE_MULTIPLIER),
                (self.image_encoder, cfg.SOLVER.IMAGE_ENCODER_MULTIPLIER),
                (self.text_encoder, cfg.SOLVER.TEXT_ENCODER_MULTIPLIER)]

    # ---------------------------------------------------------------- shared encodings
    def encode_targets(self, texts: List[str]) -> torch.Tensor:
        """T target texts (category names, ...) -> (T, width): <SPE> outputs of g on
        [<SPE>, f_text(text)], the sequence marked as a target."""
        features, padding = self.text_encoder.encode(texts)
        return self.unified_decoder([Segment(features, padding, SegmentKind.TEXT)],
                                    is_target=True).spe

    def encode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """T token ids (T,) -> (T, width): <SPE> outputs of g on [<SPE>, f_text([<s>, id,
        </s>])], marked as targets: the vocabulary targets of captioning and MLM."""
        tok = self.text_encoder.tokenizer
        ids = ids.to(self.text_encoder.device)
        bos = torch.full_like(ids, tok.bos_token_id)
        eos = torch.full_like(ids, tok.eos_token_id)
        input_ids = torch.stack([bos, ids, eos], dim=1)                     # (T, 3)
        features, padding = self.text_encoder(input_ids, torch.ones_like(input_ids))
        return self.unified_decoder([Segment(features, padding, SegmentKind.TEXT)],
                                    is_target=True).spe

    def encode_images(self, batched_inputs: List[Dict]) -> ImageEncoderOutput:
        """f_image of a batch's "image"s (preprocessed, padded): ImageEncoderOutput."""
        images, sizes = self.preprocessor(batched_inputs)
        return self.image_encoder(images.tensor, sizes)

    @staticmethod
    def image_segments(out: ImageEncoderOutput) -> List[Segment]:
        """An image's global and regional tokens as g's segments (after <SPE>)."""
        return [Segment(out.global_tokens, out.global_padding_mask, SegmentKind.IMAGE_GLOBAL),
                Segment(out.regional_tokens, None, SegmentKind.IMAGE_REGION)]

    def decode_image(self, out: ImageEncoderOutput):
        """g on [<SPE>, global tokens, regional tokens]: its output (.spe (B, width), .tokens
        (B, 1 + G + O, width))."""
        return self.unified_decoder(self.image_segments(out))

    def image_spe(self, batched_inputs: List[Dict]) -> torch.Tensor:
        """(B, width): the <SPE> outputs of g on [<SPE>, global tokens, regional tokens] of a
        batch's images (an input sequence: routing attribute TARGET off), the image side of
        classification and retrieval."""
        return self.decode_image(self.encode_images(batched_inputs)).spe

    # ---------------------------------------------------------------- tasks
    def task_of(self, batched_inputs: List[Dict]):
        """The task module a batch belongs to."""
        return self.tasks[task_of_batch(batched_inputs, list(self.tasks.keys()))]

    def prepare_for_dataset(self, dataset_name: str) -> None:
        """Before evaluating a dataset: the task its metadata names takes what it needs
        from it (e.g. its category names)."""
        task = dataset_task(dataset_name)
        if task not in self.tasks:
            raise ValueError(f"dataset {dataset_name!r} is for task {task!r}, which the model "
                             f"does not have (MODEL.TASKS: {list(self.tasks.keys())})")
        self.tasks[task].prepare_for_dataset(dataset_name)

    def forward(self, batched_inputs: List[Dict]):
        task = self.task_of(batched_inputs)
        if self.training:
            return task.losses(self, batched_inputs)
        return task.inference(self, batched_inputs)


def _rename_old_keys(state_dict, prefix, *args):
    for old, new in _RENAMED_KEYS.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
