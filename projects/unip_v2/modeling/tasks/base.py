"""The task interface of the generalist (Uni-Perceiver v2, Sec. 4.3 and Table 1).

Every pillar task is one module registered by name (`register_task`; built from MODEL.TASKS). A task
owns what makes it a task and nothing the tasks share:
- the input and target sequences it hands the unified decoder g (with their routing
  attributes), built from the shared encoders that the model passes it;
- its target set (category names, the vocabulary, in-batch texts) and its temperature;
- its loss (Eq. 7, weighted by its w_k from the config) and its inference output;
- its evaluator, chosen by a dataset's metadata (detectron2's ``evaluator_type`` habit).

The meta-architecture (`UniPerceiverV2`) holds the shared parts (image encoder, text encoder,
g, the TargetBank) and hands every batch to the task the batch names: each dataset dict
carries ``"task"`` (the data loaders add it from the dataset's metadata; a model with one
task also takes untagged inputs, as the demo gives it). Adding a task adds one module here
and one registration, not an edit of the model.
"""
from typing import Dict, List, Optional, Sequence, Type

import torch
from torch import nn

from ...data.dataset_mappers import build_dataset_mapper
from ...data.datasets.metadata import dataset_task

__all__ = ["TASK_REGISTRY", "Task", "build_tasks", "evaluator_for_dataset", "first_dataset_of",
           "register_task",
           "task_of_batch"]

# Task name -> Task class, built as cls(cfg). The name is the value of MODEL.TASKS entries, of
# a dataset's metadata "task" and of the "task" key of batched inputs. A plain dict rather
# than a detectron2 Registry: Registry keys by class name, configs and data use short names.
TASK_REGISTRY: Dict[str, Type["Task"]] = {}


def register_task(cls: Type["Task"]) -> Type["Task"]:
    """Class decorator: register a Task subclass under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a task needs a non-empty `name` to be registered")
    if TASK_REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"task name {cls.name!r} is already registered to "
                         f"{TASK_REGISTRY[cls.name].__name__}")
    TASK_REGISTRY[cls.name] = cls
    return cls


class Task(nn.Module):
    """One pillar task. Subclasses set ``name`` and implement `losses`, `inference` and
    `build_evaluator`; `prepare_for_dataset` is optional.

    `losses` and `inference` receive the generalist (``model``: its encoders, g, TargetBank
    and image preprocessing) rather than holding the shared modules themselves, so every
    parameter has one name in the state dict whatever the set of tasks.
    """

    name: str = ""

    def losses(self, model: nn.Module, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        """Weighted losses of one batch of this task (training)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement losses()")

    def inference(self, model: nn.Module, batched_inputs: List[Dict]) -> List[Dict]:
        """One output dict per input, in the format of this task's evaluator."""
        raise NotImplementedError(f"{type(self).__name__} does not implement inference()")

    def prepare_for_dataset(self, dataset_name: str) -> None:
        """Called before a dataset of this task is evaluated (e.g. to take its category
        names as the target set). Default: nothing."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_dir: str):
        """The evaluator of one dataset of this task."""
        raise NotImplementedError(f"{cls.__name__} does not implement build_evaluator()")

    @classmethod
    def task_weight(cls, cfg) -> float:
        """w_k: the weight of the task's whole loss (Eq. 7), which MT-AdamW also applies to the
        task's normalised gradient (Sec. 4.4, Table 8's omega_k). Default: the task's
        MODEL.<TASK>.LOSS_WEIGHT."""
        node = getattr(cfg.MODEL, cls.name.upper(), None)
        if node is None or "LOSS_WEIGHT" not in node:
            raise NotImplementedError(f"{cls.__name__} has no MODEL.{cls.name.upper()}"
                                      f".LOSS_WEIGHT: override Task.task_weight")
        return float(node.LOSS_WEIGHT)

    @classmethod
    def build_dataset_mapper(cls, cfg, is_train: bool):
        """The mapper of this task's datasets. Default: INPUT.DATASET_MAPPER_NAME's."""
        return build_dataset_mapper(cfg, is_train=is_train)


def build_tasks(cfg) -> nn.ModuleDict:
    """MODEL.TASKS -> {name: task}, in config order; an unknown or repeated name is a
    ValueError that lists the registered tasks."""
    names = list(cfg.MODEL.TASKS)
    if not names:
        raise ValueError("MODEL.TASKS is empty: the generalist needs at least one task "
                         f"(registered: {sorted(TASK_REGISTRY)})")
    if len(set(names)) != len(names):
        raise ValueError(f"MODEL.TASKS repeats a task: {names}")
    known = sorted(TASK_REGISTRY)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"MODEL.TASKS names unknown tasks {unknown}; registered: {known}")
    return nn.ModuleDict({n: TASK_REGISTRY[n](cfg) for n in names})


def first_dataset_of(task: str, dataset_names: Sequence[str]) -> Optional[str]:
    """The first of ``dataset_names`` whose metadata names ``task`` (None if none does): where
    a task takes its training or test target set from."""
    return next((n for n in dataset_names if dataset_task(n) == task), None)


def task_of_batch(batched_inputs: Sequence[Dict], tasks: Sequence[str]) -> str:
    """The one task a batch belongs to: the inputs' ``"task"`` (all the same), or the only
    configured task for untagged inputs."""
    named = {x.get("task") for x in batched_inputs}
    if named == {None}:
        if len(tasks) == 1:
            return tasks[0]
        raise ValueError(f"the batch names no task (no 'task' key in its inputs) and the model "
                         f"has several: {list(tasks)}")
    if len(named) != 1:
        raise ValueError(f"every batch holds one task; this one mixes {sorted(map(str, named))}")
    (task,) = named
    if task not in tasks:
        raise ValueError(f"the batch is for task {task!r}, which the model does not have "
                         f"(MODEL.TASKS: {list(tasks)})")
    return task


def evaluator_for_dataset(cfg, dataset_name: str, output_dir: str):
    """The evaluator of a dataset, built by the task its metadata names."""
    task = dataset_task(dataset_name)
    if task not in TASK_REGISTRY:
        raise ValueError(f"dataset {dataset_name!r} is for task {task!r}, which is not "
                         f"registered (known: {sorted(TASK_REGISTRY)})")
    return TASK_REGISTRY[task].build_evaluator(cfg, dataset_name, output_dir)
