"""The demo's tasks besides detection, on the user's own images (tools/demo.py --task
classify|caption|retrieve), and the text lines the main job's pictures share with them.

    predictor = TaskPredictor(cfg)
    summary = describe_images(predictor, "classification", files, outputs)  # + top-3 classes
    summary = describe_images(predictor, "captioning", files, outputs)      # + the caption
    ranking, summary = retrieve_images(predictor, files, "a red circle", "out/retrieval.png")

Each image goes through its task's test-time mapper (as in evaluation: resize and centre crop
at the task's image size) with no label or caption: the mappers take an image alone at
inference. An image that cannot be read is skipped with the mapper's warning and counted in
the summary (`DemoSummary`), the others are still drawn.
"""
import logging
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..data.image_io import try_read_image
from ..utils.visualization import image_row, with_text_lines
from .demo import DemoSummary, OutputWriteError, write_image

__all__ = ["DEMO_TASKS", "caption_line", "check_model_has_task", "describe_images",
           "read_rgb", "retrieve_images", "top_classes_line"]

logger = logging.getLogger(__name__)

# tools/demo.py --task -> the model's task (MODEL.TASKS entry)
DEMO_TASKS = {"detect": "detection", "classify": "classification", "caption": "captioning",
              "retrieve": "retrieval"}


def check_model_has_task(model, task: str) -> None:
    """A ValueError naming the model's tasks if ``task`` is not one of them."""
    tasks = getattr(model, "tasks", None)
    if tasks is None or task not in tasks:
        have = sorted(tasks) if tasks is not None else []
        raise ValueError(f"the model has no {task} task (its tasks: {have or 'none'}); use a "
                         f"config whose MODEL.TASKS includes {task!r}, e.g. "
                         f"configs/toy/multitask_R50_tiny.yaml")


def top_classes_line(class_logits: torch.Tensor, class_names: Sequence[str], k: int = 3) -> str:
    """ "top-3: red circle 0.81, red square 0.10, ..." from one image's (C,) logits."""
    if class_logits.shape != (len(class_names),):
        raise ValueError(f"top_classes_line: class_logits of shape {tuple(class_logits.shape)} "
                         f"for {len(class_names)} class names")
    probs = class_logits.float().softmax(-1)
    top = probs.topk(min(k, len(class_names)))
    return f"top-{len(top.indices)}: " + ", ".join(
        f"{class_names[int(i)]} {float(p):.2f}" for p, i in zip(*top))


def caption_line(output: Dict) -> str:
    return f"caption: {output['caption']}"


def read_rgb(path: str):
    """The image as RGB uint8 (H, W, 3), or None with a warning if it cannot be read."""
    image, error = try_read_image(path, format="RGB")
    if image is None:
        logger.warning(f"skipping {path}: not a readable image ({error})")
    return image


def describe_images(predictor, task: str, files: Sequence[str], outputs: Sequence[str],
                    batch_size: int = 16) -> DemoSummary:
    """Each image with a white band under it: the top-3 classes among the classification
    task's names (``task`` "classification") or the generated caption ("captioning"), written
    to its output (tools/demo.py plans them with `plan_outputs`)."""
    if task not in ("classification", "captioning"):
        raise ValueError(f"describe_images: task must be 'classification' or 'captioning', "
                         f"got {task!r}")
    if len(files) != len(outputs):
        raise ValueError(f"describe_images: {len(files)} files but {len(outputs)} outputs")
    check_model_has_task(predictor.model, task)
    class_names = (list(predictor.model.tasks[task].test_class_names)
                   if task == "classification" else [])
    summary = DemoSummary()
    results = predictor(task, [{"file_name": f, "image_id": i} for i, f in enumerate(files)],
                        batch_size=batch_size)
    for path, out, result in zip(files, outputs, results):
        image = read_rgb(path) if result is not None else None
        if image is None:
            summary.unreadable.append(path)
            continue
        line = (top_classes_line(result["class_logits"], class_names)
                if task == "classification" else caption_line(result))
        try:
            write_image(out, np.ascontiguousarray(with_text_lines(image, [line])[:, :, ::-1]))
        except OutputWriteError as e:
            logger.warning(f"could not write the drawing of {path}: {e}")
            summary.failed_writes.append(path)
            continue
        logger.info(f"{path}: {line} -> {out}")
        summary.drawn.append(path)
    return summary


def retrieve_images(predictor, files: Sequence[str], query: str, out: str, top_k: int = 5,
                    batch_size: int = 16) -> Tuple[List[Tuple[str, float]], DemoSummary]:
    """Rank the images for the text ``query`` by the retrieval task's cosine similarity
    (Uni-Perceiver v2, Eq. 5: the image's <SPE> output against the query's, each through g)
    and draw the ``top_k`` best side by side under the query into ``out``. Returns
    [(file, score)] best first, every readable image, and the summary (ranked images count
    as drawn)."""
    check_model_has_task(predictor.model, "retrieval")
    model = predictor.model
    retrieval = model.tasks["retrieval"]
    model.text_encoder.check_lengths([query], what="query text")
    embeddings = predictor("retrieval", [{"file_name": f, "image_id": i}
                                         for i, f in enumerate(files)],
                           batch_size=batch_size, forward=retrieval.embed_images)
    summary = DemoSummary()
    kept = []
    for path, embedding in zip(files, embeddings):
        (summary.unreadable if embedding is None else kept).append(path)
    if not kept:
        return [], summary
    with torch.no_grad():
        text = retrieval.embed_texts(model, [query])[0]
    scores = torch.stack([e for e in embeddings if e is not None]) @ text
    order = scores.argsort(descending=True).tolist()
    ranking = [(kept[i], float(scores[i])) for i in order]
    tiles, titles = [], []
    for path, score in ranking:
        image = read_rgb(path)
        if image is not None:
            tiles.append(image)
            titles.append(f"{len(tiles)}. {os.path.basename(path)} {score:.2f}")
        if len(tiles) == top_k:
            break
    try:
        if not tiles:   # every image unreadable on the second read
            raise OutputWriteError(f"no image left to draw into {out}")
        write_image(out, np.ascontiguousarray(
            image_row(tiles, titles, f'query: "{query}"')[:, :, ::-1]))
    except OutputWriteError as e:
        logger.warning(f"could not write the ranking picture: {e}")
        summary.failed_writes.extend(kept)
        return ranking, summary
    summary.drawn.extend(kept)
    logger.info(f'query "{query}": ' + ", ".join(f"{i + 1}. {p} {s:.3f}"
                                                  for i, (p, s) in enumerate(ranking))
                + f" -> {out}")
    return ranking, summary
