"""detectron2's COCOEvaluator made safe against bad ground truth and skipped images.

Ground truth: COCOEvaluator reads the dataset's ``json_file`` (metadata set by
``register_coco_instances``; a dataset without one is converted with
``convert_to_coco_json``) into a pycocotools COCO, and segm evaluation turns every GT
segmentation into an RLE: ``[[]]`` crashes there, ``[]`` or a missing key too, and a list
whose first polygon has 4 numbers is read as boxes. A copy of the GT with the invalid polygons
removed (:func:`check_segmentation`, the training mapper's rule) is used for segm; an
annotation with no valid polygon / RLE left is excluded from segm evaluation only (a
prediction on that object then counts as a false positive for segm) and stays in bbox
evaluation, whose GT is the json as it is. Both are warned and counted.

Skipped images: the test loader leaves out images its mapper cannot read
(``unip_v2.data.test_loader``). Their GT stays in the evaluation, so each counts as an
image with no detections (lower recall and AP, never an inflated score); ``evaluate``
warns with their number, kept in :attr:`CheckedCOCOEvaluator.num_images_without_predictions`.
"""
import contextlib
import copy
import io
import itertools
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pycocotools.coco import COCO

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from ..data.segmentation import check_segmentation

__all__ = ["CheckedCOCOEvaluator", "segm_ground_truth"]

logger = logging.getLogger(__name__)


def segm_ground_truth(coco_api: COCO, dataset_name: str = "") -> Tuple[COCO, int, int]:
    """The ground truth to use for segm evaluation.

    Returns:
        (coco, dropped_polygons, excluded_annotations): ``coco_api`` itself when every
        non-crowd and crowd segmentation is valid, else a new COCO whose annotations are
        copies with the invalid polygons left out and without the annotations that have no
        valid segmentation left. ``coco_api`` is not modified.
    """
    annotations, dropped, excluded, examples = [], 0, 0, []
    images = coco_api.imgs
    for ann in coco_api.dataset.get("annotations", []):
        image = images.get(ann.get("image_id"), {})
        size = (image.get("height", 0), image.get("width", 0))
        check = check_segmentation(ann.get("segmentation"), size)
        if not check.reasons:
            annotations.append(ann)
            continue
        dropped += check.dropped_polygons
        if check.segmentation is None:
            excluded += 1
        else:
            annotations.append(dict(ann, segmentation=check.segmentation))
        if len(examples) < 5:
            examples.append(f"annotation id {ann.get('id')}: {'; '.join(check.reasons)}")
    if not dropped and not excluded:
        return coco_api, 0, 0
    logger.warning(
        f"Ground truth of {dataset_name or 'the dataset'}: {dropped} invalid polygon(s) "
        f"dropped and {excluded} annotation(s) with no valid segmentation excluded from segm "
        "evaluation (kept for bbox evaluation). E.g. " + " | ".join(examples)
    )
    sanitised = COCO()
    sanitised.dataset = dict(coco_api.dataset, annotations=annotations)
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        sanitised.createIndex()
    return sanitised, dropped, excluded


class CheckedCOCOEvaluator(COCOEvaluator):
    """detectron2's :class:`COCOEvaluator` (pycocotools' official COCOeval,
    ``use_fast_impl=False``: the fast one needs detectron2's compiled ops) with a checked
    segm ground truth and a count of dataset images that got no prediction (see the module
    docstring). Results are detectron2's.

    Attributes:
        num_segm_polygons_dropped, num_segm_annotations_excluded: GT problems (see
            :func:`segm_ground_truth`).
        num_images_without_predictions: set by ``evaluate`` on the main process.
    """

    def __init__(self, dataset_name: str, tasks: Optional[Sequence[str]] = None,
                 distributed: bool = True, output_dir: Optional[str] = None, *,
                 max_dets_per_image: Optional[int] = None):
        # COCOEvaluator maps predicted class indices back to the json's category ids only if
        # the metadata has thing_dataset_id_to_contiguous_id, which load_coco_json sets when
        # the dataset is loaded; without it every prediction would silently get a wrong id.
        metadata = MetadataCatalog.get(dataset_name)
        if (dataset_name in DatasetCatalog.list()
                and not hasattr(metadata, "thing_dataset_id_to_contiguous_id")):
            DatasetCatalog.get(dataset_name)
        super().__init__(dataset_name, tasks=tasks, distributed=distributed,
                         output_dir=output_dir, max_dets_per_image=max_dets_per_image,
                         use_fast_impl=False)
        self._dataset_name = dataset_name
        self._segm_coco_api = self._coco_api
        self.num_segm_polygons_dropped = self.num_segm_annotations_excluded = 0
        self.num_images_without_predictions = 0
        if self._do_evaluation:
            (self._segm_coco_api, self.num_segm_polygons_dropped,
             self.num_segm_annotations_excluded) = segm_ground_truth(self._coco_api, dataset_name)

    def reset(self):
        super().reset()
        self._seen_image_ids = set()

    def process(self, inputs, outputs):
        super().process(inputs, outputs)
        self._seen_image_ids.update(x["image_id"] for x in inputs)

    def evaluate(self, img_ids=None):
        self._count_images_without_predictions(img_ids)
        return super().evaluate(img_ids)

    def _count_images_without_predictions(self, img_ids) -> None:
        """Warn about (and count) the dataset images ``process`` never saw."""
        seen = self._seen_image_ids
        if self._distributed:
            comm.synchronize()
            seen = set().union(*comm.gather(seen, dst=0))
            if not comm.is_main_process():
                return
        expected = set(self._coco_api.getImgIds() if img_ids is None else img_ids)
        missing = expected - seen
        self.num_images_without_predictions = len(missing)
        if missing:
            logger.warning(
                f"{len(missing)} of {len(expected)} image(s) of {self._dataset_name} have no "
                f"prediction (skipped by the test loader; e.g. image ids {sorted(missing)[:5]}): "
                "each counts as an image with no detections, lowering recall and AP."
            )

    def _ground_truth(self, task: str) -> COCO:
        return self._segm_coco_api if task == "segm" else self._coco_api

    def _eval_predictions(self, predictions: List[Dict[str, Any]], img_ids=None) -> None:
        """detectron2's per task, each on its own ground truth when they differ."""
        if self._segm_coco_api is self._coco_api:
            return super()._eval_predictions(predictions, img_ids=img_ids)
        coco_results = list(itertools.chain(*[x["instances"] for x in predictions]))
        tasks = self._tasks or self._tasks_from_predictions(coco_results)
        saved = self._tasks, self._coco_api
        try:
            for task in sorted(tasks):
                self._tasks, self._coco_api = (task,), self._ground_truth(task)
                # detectron2 edits the result dicts in place (category ids, "bbox" for segm).
                super()._eval_predictions(copy.deepcopy(predictions), img_ids=img_ids)
        finally:
            self._tasks, self._coco_api = saved
