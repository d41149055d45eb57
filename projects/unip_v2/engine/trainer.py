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

import torch

from detectron2.engine import DefaultTrainer
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils import comm

from ..data.build import build_train_loader
from ..data.dataset_mappers import TaskTaggedMapper
from ..data.datasets.metadata import dataset_task
from ..data.test_loader import build_test_loader
from ..modeling.tasks import TASK_REGISTRY
from ..solver import build_optimizer
from ..utils.rng import fork_rng, get_rng_state, set_rng_state
from .checkpointer import Checkpointer
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


def train_task(cfg) -> str:
    """The one task of DATASETS.TRAIN (single-task training: every training dataset is for
    the same task; several tasks are the multi-task trainer's)."""
    tasks = {name: dataset_task(name) for name in cfg.DATASETS.TRAIN}
    if len(set(tasks.values())) != 1:
        raise ValueError(f"DATASETS.TRAIN must name datasets of one task, got {tasks}")
    return next(iter(tasks.values()))


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
        super().__init__(cfg)

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
        SOLVER.IMS_PER_BATCH split over the processes."""
        task = train_task(cfg)
        return build_train_loader(cfg, task_mapper(cfg, task, is_train=True),
                                  batch_size=task_batch_size(cfg, task))

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
