"""`Trainer`: detectron2's DefaultTrainer with unip-v2's data mappers, evaluators and
optimiser, and a checkpoint from which training resumes exactly. Used by tools/train_net.py
(train, --eval-only, --resume).

What a checkpoint holds (`Trainer.state_dict`): the model; the iteration; the LR scheduler
(detectron2's hook state); the optimiser (AdamW's moments and step counts, the current
learning rates) and, under AMP, the gradient scaler; the train loader's seed and stream
position; the random generators' states (Python, NumPy, torch). With them, N iterations then
`--resume` give the same per-iteration losses as one run, bit for bit (with DATALOADER
.NUM_WORKERS fixed; tests/test_resume.py). Checkpoints are written atomically and resume
falls back past unreadable ones (`engine/checkpointer.py`).
"""
import logging
import os
import weakref
from collections import OrderedDict
from typing import List

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import (AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase,
                               create_ddp_model)
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data.build import build_train_loader, train_seed
from ..data.multitask import (MultiTaskTrainLoader, TaskDataset, sampling_ratios,
                              task_dataset_weights)
from ..data.dataset_mappers import TaskTaggedMapper
from ..data.datasets.metadata import dataset_task
from ..data.test_loader import build_test_loader
from ..modeling.tasks import TASK_REGISTRY
from ..solver import build_optimizer
from ..utils.rng import derived_seed, fork_rng, get_rng_state, set_rng_state
from .checkpointer import Checkpointer
from .multitask import TaskStepTrainer
from .results_table import results_table

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)


def task_mapper(cfg, task: str, is_train: bool) -> TaskTaggedMapper:
    """The mapper of a task's datasets, its outputs naming the task."""
    if task not in TASK_REGISTRY:
        raise ValueError(f"no registered task {task!r} (known: {sorted(TASK_REGISTRY)})")
    return TaskTaggedMapper(TASK_REGISTRY[task].build_dataset_mapper(cfg, is_train), task)


def task_batch_size(cfg, task: str) -> int:
    """MODEL.<TASK>.BATCH_SIZE (samples per process; 0 = not set)."""
    node = getattr(cfg.MODEL, task.upper(), None)
    return int(node.BATCH_SIZE) if node is not None and "BATCH_SIZE" in node else 0


def train_tasks(cfg) -> List[str]:
    """The task of each DATASETS.TRAIN entry (from its metadata)."""
    if not cfg.DATASETS.TRAIN:
        raise ValueError("DATASETS.TRAIN is empty: name at least one training dataset")
    return [dataset_task(name) for name in cfg.DATASETS.TRAIN]


def build_multitask_train_loader(cfg) -> MultiTaskTrainLoader:
    """One resumable stream per DATASETS.TRAIN entry (its task's mapper and batch size, seed
    derived from (SEED, k)), s_k and w_k as data/multitask.py says, and the task sampler."""
    tasks = train_tasks(cfg)
    if cfg.DATALOADER.TASK_SAMPLING == "mixed" and cfg.SOLVER.OPTIMIZER.upper() == "MT-ADAMW":
        raise ValueError("MT-AdamW normalises the gradient of the one task an iteration trains; "
                         "under DATALOADER.TASK_SAMPLING 'mixed' every iteration holds every "
                         "task: use SOLVER.OPTIMIZER ADAMW (Table 4's mixed row)")
    seed = train_seed(cfg)
    loaders = [build_train_loader(cfg, task_mapper(cfg, task, is_train=True),
                                  batch_size=task_batch_size(cfg, task), dataset_names=[name],
                                  seed=derived_seed(seed, k))
               for k, (name, task) in enumerate(zip(cfg.DATASETS.TRAIN, tasks))]
    ratios = sampling_ratios(tasks, [len(loader.dataset) for loader in loaders],
                             cfg.DATALOADER.SAMPLING_RATIOS)
    weights = task_dataset_weights(
        tasks, ratios, {t: TASK_REGISTRY[t].task_weight(cfg) for t in set(tasks)})
    several = {t for t in tasks if tasks.count(t) > 1}
    task_datasets = [TaskDataset(f"{t}:{name}" if t in several else t, name, t, r, w)
                     for name, t, r, w in zip(cfg.DATASETS.TRAIN, tasks, ratios, weights)]
    # Unmixed sampling needs no communication only if every process draws from the same
    # (seed, ratios, task-datasets): check that once, so that processes started with
    # different configs fail here with a message rather than inside a collective.
    plan = (seed, cfg.DATALOADER.TASK_SAMPLING, [(td.label, td.sampling_ratio) for td in
                                                  task_datasets])
    plans = comm.all_gather(plan)
    if any(p != plan for p in plans):
        raise ValueError(f"the training processes disagree on the task sampling (seed, mode, "
                         f"task-datasets and ratios per process): {plans}")
    logger.info("Multi-task training (" + cfg.DATALOADER.TASK_SAMPLING + " sampling): "
                + ", ".join(f"{td.label} s={td.sampling_ratio:.4g} w={td.weight:.4g} batch="
                            f"{loader.batch_size}" for td, loader in zip(task_datasets, loaders)))
    return MultiTaskTrainLoader(task_datasets, loaders, seed, cfg.DATALOADER.TASK_SAMPLING)


class Trainer(DefaultTrainer):
    """SOLVER.AMP.ENABLED trains under fp16 autocast with a gradient scaler (detectron2's
    AMPTrainer, CUDA only); losses and the matcher run in float32 whatever the autocast."""

    def __init__(self, cfg):
        if cfg.SOLVER.AMP.ENABLED and (cfg.MODEL.DEVICE == "cpu" or not torch.cuda.is_available()):
            raise ValueError(f"SOLVER.AMP.ENABLED needs a CUDA device (detectron2's AMPTrainer "
                             f"uses CUDA autocast); MODEL.DEVICE is {cfg.MODEL.DEVICE!r} and "
                             f"torch.cuda.is_available() is {torch.cuda.is_available()}")
        period = cfg.SOLVER.CHECKPOINT_PERIOD
        if not (isinstance(period, int) and period > 0):
            raise ValueError(f"SOLVER.CHECKPOINT_PERIOD must be a positive number of iterations, "
                             f"got {period!r} (a checkpoint is also written at the last "
                             f"iteration; use a period >= SOLVER.MAX_ITER for that one only)")
        self._init_like_default_trainer(cfg)

    def _init_like_default_trainer(self, cfg):
        """DefaultTrainer.__init__ with three changes: DistributedDataParallel without
        device_ids on a CPU (torchrun with gloo; detectron2 passes the local rank as a CUDA
        device), with find_unused_parameters when the model has several tasks (a batch of one
        task leaves the other tasks' parameters without gradient), and the multi-task step
        (engine/multitask.py) when DATASETS.TRAIN names several tasks."""
        TrainerBase.__init__(self)
        logger_d2 = logging.getLogger("detectron2")
        if not logger_d2.isEnabledFor(logging.INFO):   # setup_logger not called for detectron2
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        tasks = getattr(model, "tasks", ())
        model = create_ddp_model(model, broadcast_buffers=False,
                                 find_unused_parameters=len(tasks) > 1,
                                 **({} if cfg.MODEL.DEVICE.startswith("cuda")
                                    else {"device_ids": None}))
        if isinstance(data_loader, MultiTaskTrainLoader):
            self._trainer = TaskStepTrainer(model, data_loader, optimizer,
                                            amp=cfg.SOLVER.AMP.ENABLED)
        else:
            self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
                model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR,
                                                  trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        # Swap detectron2's checkpointer for the atomic, verifying one before the hooks
        # (PeriodicCheckpointer) take a reference to it.
        old = self.checkpointer
        self.checkpointer = Checkpointer(old.model, old.save_dir, save_to_disk=old.save_to_disk,
                                         trainer=weakref.proxy(self))
        return super().build_hooks()

    def state_dict(self):
        """Everything training depends on (see the module docstring). detectron2 0.6's
        DefaultTrainer saves only the iteration and the hooks (the LR scheduler)."""
        state = super().state_dict()
        state["_trainer"] = self._trainer.state_dict()   # optimizer (+ grad_scaler under AMP)
        if hasattr(self.data_loader, "state_dict"):
            state["data_loader"] = self.data_loader.state_dict()
        state["rng"] = get_rng_state()
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "_trainer" not in state:
            raise KeyError("the checkpoint holds no optimiser state ('_trainer'): it was not "
                           "written by this trainer; load it with MODEL.WEIGHTS instead of "
                           "--resume to start a new run from its weights")
        self._trainer.load_state_dict(state["_trainer"])
        if "data_loader" in state and hasattr(self.data_loader, "load_state_dict"):
            self.data_loader.load_state_dict(state["data_loader"])
        # last: nothing between here and the first resumed iteration draws random numbers
        if "rng" in state:
            set_rng_state(state["rng"])

    @classmethod
    def build_train_loader(cls, cfg):
        """Batches of DATASETS.TRAIN through their task's mapper, each input naming the
        task; MODEL.<TASK>.BATCH_SIZE samples per process when set, else
        SOLVER.IMS_PER_BATCH split over the processes. Datasets of one task: one stream over
        them all; of several tasks: one stream per dataset and a task drawn per iteration
        (`build_multitask_train_loader`)."""
        tasks = train_tasks(cfg)
        if len(set(tasks)) > 1:
            return build_multitask_train_loader(cfg)
        return build_train_loader(cfg, task_mapper(cfg, tasks[0], is_train=True),
                                  batch_size=task_batch_size(cfg, tasks[0]))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """The dataset's task's mapper in test mode, each input naming the task; images it
        cannot use are left out, warned and counted (unip_v2.data.test_loader), not replaced
        by others."""
        mapper = task_mapper(cfg, dataset_task(dataset_name), is_train=False)
        return build_test_loader(dataset_name, mapper, num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """The meta-architecture's choice: the generalist asks the task the dataset's
        metadata names; the proposal network evaluates class-agnostically."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        meta_arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        return meta_arch.build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's test loop, one dataset at a time; before each, the model's task for
        that dataset takes what it needs from it (`prepare_for_dataset`: detection takes the
        dataset's thing_classes unless MODEL.DETECTION.TEST_CLASS_NAMES fixes them), so
        DATASETS.TEST may hold datasets with different categories (toy_shapes_val and
        toy_shapes_novel, say) or of different tasks."""
        # Evaluation in the middle of training must not move the training's random numbers
        # (the test mapper draws from NumPy): a resumed run would otherwise diverge.
        with fork_rng():
            return cls._test(cfg, model, evaluators)

    @classmethod
    def _test(cls, cfg, model, evaluators=None):
        core = getattr(model, "module", model)   # DistributedDataParallel wraps the model
        if not hasattr(core, "prepare_for_dataset"):
            return super().test(cfg, model, evaluators)
        if evaluators is not None and len(evaluators) != len(cfg.DATASETS.TEST):
            raise ValueError(f"{len(evaluators)} evaluators for {len(cfg.DATASETS.TEST)} "
                             f"datasets in DATASETS.TEST")
        results = OrderedDict()
        for i, name in enumerate(cfg.DATASETS.TEST):
            core.prepare_for_dataset(name)
            one = cfg.clone()
            one.defrost()
            one.DATASETS.TEST = (name,)
            results[name] = super().test(one, model, None if evaluators is None
                                         else [evaluators[i]])
        if len(results) > 1 and comm.is_main_process():
            logger.info("Results of every dataset of DATASETS.TEST:\n"
                        + results_table(results))
        return list(results.values())[0] if len(results) == 1 else results
