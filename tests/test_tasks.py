"""The task interface of the generalist: tasks built by name from MODEL.TASKS, every batch
handed to the one task it names, datasets naming their task (and so their evaluator),
parameters keeping one name whatever the tasks, old checkpoints loading."""
import json

import pytest
import torch

import unip_v2  # noqa: F401  first: makes detectron2 importable

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model

from unip_v2.data.dataset_mappers import TaskTaggedMapper
from unip_v2.data.datasets.metadata import dataset_task
from unip_v2.engine import Trainer
from unip_v2.evaluation import CheckedCOCOEvaluator, ClassAgnosticCOCOEvaluator
from unip_v2.modeling.tasks import TASK_REGISTRY, Task, build_tasks, register_task, task_of_batch

from test_uni_perceiver_v2 import NAMES, batch, cfg  # noqa: F401  (the tiny generalist)


class EchoTask(Task):
    """A second task for the dispatch tests: its loss reads the unified decoder's <SPE>
    parameter, so which task ran shows in the loss's name and its gradient."""

    name = "unip_test_echo"

    def __init__(self, cfg):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def losses(self, model, batched_inputs):
        return {"loss_echo": self.scale * model.unified_decoder.spe.sum() * len(batched_inputs)}

    def inference(self, model, batched_inputs):
        return [{"echo": i} for i in range(len(batched_inputs))]


@pytest.fixture
def echo_registered():
    register_task(EchoTask)
    yield EchoTask
    TASK_REGISTRY.pop(EchoTask.name)


def test_build_tasks_by_name_and_clear_errors(cfg):
    tasks = build_tasks(cfg)
    assert list(tasks.keys()) == ["detection"] and tasks["detection"].name == "detection"
    for names, message in (([], "MODEL.TASKS is empty"),
                           (["detection", "detection"], "repeats a task"),
                           (["detection", "captionning"], r"unknown tasks \['captionning'\]")):
        bad = cfg.clone()
        bad.MODEL.TASKS = names
        with pytest.raises(ValueError, match=message):
            build_tasks(bad)


def test_register_task_refuses_a_taken_name(echo_registered):
    class Other(Task):
        name = EchoTask.name

    with pytest.raises(ValueError, match="already registered to EchoTask"):
        register_task(Other)
    register_task(EchoTask)                       # the same class again is fine


def test_task_of_batch():
    untagged, echo = [{"image": 0}, {"image": 1}], [{"task": "echo"}, {"task": "echo"}]
    assert task_of_batch(untagged, ["detection"]) == "detection"
    assert task_of_batch(echo, ["detection", "echo"]) == "echo"
    with pytest.raises(ValueError, match="names no task"):
        task_of_batch(untagged, ["detection", "echo"])
    with pytest.raises(ValueError, match="mixes"):
        task_of_batch([{"task": "echo"}, {"task": "detection"}], ["detection", "echo"])
    with pytest.raises(ValueError, match="does not have"):
        task_of_batch(echo, ["detection"])


def test_a_model_with_two_tasks_hands_each_batch_to_its_task(cfg, echo_registered):
    two = cfg.clone()
    two.MODEL.TASKS = ["detection", EchoTask.name]
    torch.manual_seed(0)
    model = build_model(two).train()
    # the tasks' own parameters live under tasks.<name>; the shared ones keep their names
    names = {n for n, _ in model.named_parameters()}
    assert {"tasks.unip_test_echo.scale", "tasks.detection.logit_scale.log_scale",
            "unified_decoder.spe"} <= names
    detection = [dict(x, task="detection") for x in batch()]
    echo = [{"task": EchoTask.name}] * 3
    losses = model(echo)
    assert set(losses) == {"loss_echo"}
    want = 2.0 * model.unified_decoder.spe.detach().sum() * 3
    assert losses["loss_echo"].item() == pytest.approx(want.item(), rel=1e-6)
    losses["loss_echo"].backward()
    assert model.tasks["unip_test_echo"].scale.grad.item() == pytest.approx(
        (want / 2).item(), rel=1e-6)
    assert model.tasks["detection"].logit_scale.log_scale.grad is None   # detection not run
    model.zero_grad()
    losses = model(detection)
    assert "loss_class" in losses and "loss_echo" not in losses
    sum(losses.values()).backward()
    assert model.tasks["unip_test_echo"].scale.grad is None               # echo not run
    assert model.tasks["detection"].logit_scale.log_scale.grad.abs() > 0
    with pytest.raises(ValueError, match="names no task"):
        model(batch())
    assert model.eval()(echo) == [{"echo": 0}, {"echo": 1}, {"echo": 2}]


def _tiny_coco(tmp_path, name):
    """A one-image COCO instances file registered with detectron2's register_coco_instances
    (which sets evaluator_type "coco" and no task)."""
    if name in DatasetCatalog.list():
        return
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                             "bbox": [1, 1, 4, 4], "area": 16,
                             "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]}],
            "categories": [{"id": 1, "name": "red circle"}]}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(coco))
    register_coco_instances(name, {}, str(path), str(tmp_path))


def test_datasets_name_their_task_and_evaluator(cfg, tmp_path):
    _tiny_coco(tmp_path, "unip_test_tasks_coco")
    assert dataset_task("unip_test_tasks_coco") == "detection"    # evaluator_type "coco"
    assert dataset_task("toy_shapes_val") == "detection"
    MetadataCatalog.get("unip_test_tasks_cls").set(task="classification")
    assert dataset_task("unip_test_tasks_cls") == "classification"
    with pytest.raises(ValueError, match="names no task"):
        dataset_task("unip_test_tasks_nothing")
    ev = Trainer.build_evaluator(cfg, "unip_test_tasks_coco", str(tmp_path))
    assert type(ev) is CheckedCOCOEvaluator
    agnostic = cfg.clone()
    agnostic.MODEL.META_ARCHITECTURE = "UniPerceiverV2ProposalNetwork"
    assert type(Trainer.build_evaluator(agnostic, "unip_test_tasks_coco", str(tmp_path))) is \
        ClassAgnosticCOCOEvaluator
    MetadataCatalog.get("unip_test_tasks_unknown").set(task="unip_test_no_such_task")
    with pytest.raises(ValueError, match="not registered"):
        Trainer.build_evaluator(cfg, "unip_test_tasks_unknown", str(tmp_path))


def test_loaders_tag_inputs_with_their_task():
    mapper = TaskTaggedMapper(lambda d: None if d.get("bad") else {"image_id": d["id"]}, "echo")
    assert mapper({"id": 3}) == {"image_id": 3, "task": "echo"}
    assert mapper({"id": 4, "bad": True}) is None          # a dropped input stays dropped


def test_prepare_for_dataset_gives_detection_the_datasets_names(cfg):
    model = build_model(cfg)
    model.prepare_for_dataset("toy_shapes_val")
    names = model.tasks["detection"].test_class_names
    assert names == list(MetadataCatalog.get("toy_shapes_val").thing_classes) != NAMES
    fixed = cfg.clone()
    fixed.MODEL.DETECTION.TEST_CLASS_NAMES = ["purple pentagon"]
    model = build_model(fixed)
    model.prepare_for_dataset("toy_shapes_val")
    assert model.tasks["detection"].test_class_names == ["purple pentagon"]
    MetadataCatalog.get("unip_test_tasks_cls2").set(task="classification")
    with pytest.raises(ValueError, match="which the model does not have"):
        model.prepare_for_dataset("unip_test_tasks_cls2")


def test_a_checkpoint_from_before_the_task_interface_loads(cfg):
    """The detection temperature was the model's `logit_scale`; it is the detection task's
    now. An old state dict loads strictly, its value in the new place."""
    torch.manual_seed(0)
    model = build_model(cfg)
    state = model.state_dict()
    old = {("logit_scale.log_scale" if k == "tasks.detection.logit_scale.log_scale" else k): v
           for k, v in state.items()}
    old["logit_scale.log_scale"] = torch.tensor(1.234)
    fresh = build_model(cfg)
    fresh.load_state_dict(old, strict=True)
    assert fresh.tasks["detection"].logit_scale.log_scale.item() == pytest.approx(1.234)


def test_a_tasks_batch_size_sets_its_train_batch(cfg, tmp_path):
    """MODEL.<TASK>.BATCH_SIZE samples per process (Table 8's per-GPU batches); 0 falls back
    to SOLVER.IMS_PER_BATCH over the processes (one here)."""
    import numpy as np
    from PIL import Image

    name = "unip_test_tasks_batch_size"
    files = []
    for i in range(5):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(files[-1])
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [{"file_name": f, "image_id": i, "label": i % 3}
                                               for i, f in enumerate(files)])
        MetadataCatalog.get(name).set(task="classification", class_names=NAMES)
    c = cfg.clone()
    c.MODEL.TASKS = ["classification"]
    c.DATASETS.TRAIN = (name,)
    c.MODEL.CLASSIFICATION.IMAGE_SIZE = 16
    c.DATALOADER.NUM_WORKERS = 0
    c.SOLVER.IMS_PER_BATCH = 4
    for batch_size, want in ((3, 3), (0, 4)):
        c.MODEL.CLASSIFICATION.BATCH_SIZE = batch_size
        got = next(iter(Trainer.build_train_loader(c)))
        assert len(got) == want and {x["task"] for x in got} == {"classification"}
