"""Class-agnostic COCO box / mask evaluation ("is there an object here?").

Every ground-truth annotation and every prediction is put in one category before COCOeval
runs, so a detection counts as correct whatever class it predicts. This scores the general
region proposals of unip-v2 independently of the classifier. Crowd annotations stay crowd
(matches to them are ignored, as in standard COCO evaluation).
"""
import contextlib
import io
import itertools
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectron2.evaluation.coco_evaluation import COCOevalMaxDets
from detectron2.utils.file_io import PathManager

from .checked_coco import CheckedCOCOEvaluator

__all__ = ["AGNOSTIC_CATEGORY_ID", "ClassAgnosticCOCOEvaluator", "make_class_agnostic_coco"]

# The single category every annotation and prediction is mapped to.
AGNOSTIC_CATEGORY_ID = 1

_SUPPORTED_TASKS = ("bbox", "segm")


def make_class_agnostic_coco(coco_api: COCO) -> COCO:
    """A new COCO api whose annotations all have category ``AGNOSTIC_CATEGORY_ID``.

    ``coco_api`` (and the json file it came from) is left unchanged: every annotation dict is
    copied; their segmentation lists are shared, which is safe because COCOeval only
    replaces keys of the (copied) dicts. ``iscrowd`` is kept.
    """
    src = coco_api.dataset
    dataset = {k: v for k, v in src.items() if k not in ("annotations", "categories")}
    dataset["categories"] = [
        {"id": AGNOSTIC_CATEGORY_ID, "name": "object", "supercategory": "object"}
    ]
    dataset["annotations"] = [
        dict(ann, category_id=AGNOSTIC_CATEGORY_ID) for ann in src.get("annotations", [])
    ]
    agnostic = COCO()
    agnostic.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        agnostic.createIndex()
    return agnostic


class ClassAgnosticCOCOEvaluator(CheckedCOCOEvaluator):
    """detectron2's :class:`COCOEvaluator` with all classes merged into one (on the checked
    ground truth of :class:`CheckedCOCOEvaluator`; images without predictions are misses).

    Input per image (``process``): the model input dict (needs ``image_id``) and an output
    dict ``{"instances": Instances}`` with ``pred_boxes`` (XYXY absolute, original image
    size), ``scores`` (N,), ``pred_classes`` (N,; ignored) and, for "segm", ``pred_masks``
    (bool (N, H, W)).

    ``evaluate()`` returns ``{task: {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1",
    "AR@10", "AR@<max_dets>"}}`` for each task in ``tasks``, in percent (NaN where COCOeval
    has no ground truth for a metric, e.g. an area range without objects). Images with no
    detections count as misses: if no image has any, every metric is 0 (or NaN), not an
    error. ``{}`` (with a warning) when ``process`` never saw an image, as in detectron2.

    Uses pycocotools' official COCOeval (``use_fast_impl=False``): the fast implementation
    needs detectron2's compiled ops.
    """

    def __init__(
        self,
        dataset_name: str,
        tasks: Sequence[str] = _SUPPORTED_TASKS,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        max_dets_per_image: Optional[int] = None,
    ):
        """
        Args:
            dataset_name: a registered dataset with a COCO json (``json_file`` metadata) or in
                detectron2's standard format (then ``output_dir`` is needed to convert it).
            tasks: subset of ("bbox", "segm").
            distributed: gather predictions from all ranks and evaluate on rank 0.
            output_dir: where to dump predictions (optional).
            max_dets_per_image: detections kept per image (default 100, the COCO limit).

        Raises:
            ValueError: unknown or empty ``tasks``, or a non-positive ``max_dets_per_image``.
        """
        tasks = tuple(tasks) if not isinstance(tasks, str) else (tasks,)
        unknown = [t for t in tasks if t not in _SUPPORTED_TASKS]
        if not tasks or unknown:
            raise ValueError(
                f"ClassAgnosticCOCOEvaluator tasks must be a non-empty subset of "
                f"{_SUPPORTED_TASKS}, got {tasks!r}"
            )
        if max_dets_per_image is not None and not (
            isinstance(max_dets_per_image, int) and max_dets_per_image > 0
        ):
            raise ValueError(
                f"max_dets_per_image must be a positive int or None, got {max_dets_per_image!r}"
            )
        super().__init__(
            dataset_name,
            tasks=tasks,
            distributed=distributed,
            output_dir=output_dir,
            max_dets_per_image=max_dets_per_image,
        )
        if self._do_evaluation:
            segm_is_bbox_gt = self._segm_coco_api is self._coco_api
            self._coco_api = make_class_agnostic_coco(self._coco_api)
            self._segm_coco_api = (self._coco_api if segm_is_bbox_gt
                                   else make_class_agnostic_coco(self._segm_coco_api))

    def _eval_predictions(self, predictions: List[Dict[str, Any]], img_ids=None) -> None:
        """Fill ``self._results[task]`` for each task (replaces detectron2's version, whose
        class-id mapping and per-category tables do not apply here)."""
        coco_results = [
            dict(r, category_id=AGNOSTIC_CATEGORY_ID)
            for r in itertools.chain.from_iterable(p["instances"] for p in predictions)
        ]
        if self._output_dir:
            path = os.path.join(self._output_dir, "coco_instances_results_class_agnostic.json")
            self._logger.info(f"Saving class-agnostic results to {path}")
            with PathManager.open(path, "w") as f:
                json.dump(coco_results, f)

        if not self._do_evaluation:
            self._logger.info("Annotations are not available for evaluation.")
            return

        unknown_ids = {r["image_id"] for r in coco_results} - set(self._coco_api.getImgIds())
        if unknown_ids:
            raise ValueError(
                f"predictions for image ids not in the dataset's json: {sorted(unknown_ids)[:10]}"
            )
        if "segm" in self._tasks and any("segmentation" not in r for r in coco_results):
            raise ValueError("task 'segm' needs pred_masks in every output's instances")

        for task in self._tasks:
            coco_eval = self._run_cocoeval(coco_results, task, img_ids)
            results = self._derive_coco_results(coco_eval, task)  # AP fields only
            # stats[6:9] are AR at maxDets[0], [1], [2] (COCOeval's summary order).
            for stat, max_dets in zip(coco_eval.stats[6:9], self._max_dets_per_image):
                results[f"AR@{max_dets}"] = float(stat * 100) if stat >= 0 else float("nan")
            self._logger.info(
                f"Class-agnostic {task}: "
                + ", ".join(f"{k}={v:.3f}" for k, v in results.items())
            )
            self._results[task] = results

    def _run_cocoeval(self, coco_results: List[Dict[str, Any]], task: str, img_ids) -> COCOeval:
        """Run pycocotools' COCOeval on the class-agnostic ground truth; summarised."""
        if task == "segm":
            # Without "bbox", loadRes takes a result's area from its mask, so the small /
            # medium / large split uses mask area (as detectron2 does).
            coco_results = [{k: v for k, v in r.items() if k != "bbox"} for r in coco_results]
        coco_gt = self._ground_truth(task)
        if coco_results:
            coco_dt = coco_gt.loadRes(coco_results)
        else:
            # loadRes cannot take an empty list; an empty result set makes every GT a miss.
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(coco_gt.dataset["images"]),
                "categories": list(coco_gt.dataset["categories"]),
                "annotations": [],
            }
            with contextlib.redirect_stdout(io.StringIO()):
                coco_dt.createIndex()

        # COCOeval.summarize reads AP at exactly 100 detections; detectron2's variant reads
        # it at maxDets[2], needed when max_dets_per_image is not 100.
        eval_cls = COCOeval if self._max_dets_per_image[2] == 100 else COCOevalMaxDets
        coco_eval = eval_cls(coco_gt, coco_dt, task)
        coco_eval.params.maxDets = list(self._max_dets_per_image)
        if img_ids is not None:
            coco_eval.params.imgIds = list(img_ids)
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):  # pycocotools prints its progress/table
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        self._logger.info(f"COCOeval ({task}, class-agnostic):\n{summary.getvalue()}")
        return coco_eval
