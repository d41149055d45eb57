"""The training step of multi-task training (Uni-Perceiver v2, Sec. 4.4): the loader's
`TaskBatch` (unmixed sampling) or list of them (mixed) goes through the model, the losses are
logged per task, and MT-AdamW learns which task it steps (its s_k and w_k).

What goes to detectron2's EventStorage (metrics.json, TensorBoard) every iteration:
- ``<label>/<loss name>``: the drawn task's losses, each of them even when the task has one
  (``label``: the task, or "task:dataset" when a task has several datasets), and
  ``total_loss``;
- ``task_drawn``: the index of the drawn task-dataset in DATASETS.TRAIN (unmixed);
- ``<label>/grad_norm``: the global gradient norm of the step (after the processes' average,
  before MT-AdamW normalises it; MT-AdamW only, where it is computed anyway);
- ``<label>/times_drawn``: how often each task-dataset has been drawn so far.
"""
import math
import time
from typing import List

import torch

from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..data.multitask import TaskBatch
from ..solver import MTAdamW

__all__ = ["TaskStepTrainer"]


def _batches(data) -> List[TaskBatch]:
    batches = data if isinstance(data, list) else [data]
    if not all(isinstance(b, TaskBatch) for b in batches):
        raise TypeError(f"TaskStepTrainer needs the multi-task loader's TaskBatch items, got "
                        f"{type(data).__name__}")
    return batches


class TaskStepTrainer(SimpleTrainer):
    """detectron2's SimpleTrainer step (AMPTrainer's with ``amp``) for the multi-task loader:
    one forward per batch of the iteration (one batch unmixed, one per task-dataset mixed),
    one backward of their summed losses, then the optimiser, told the drawn task's s_k and w_k
    when it is MT-AdamW."""

    def __init__(self, model, data_loader, optimizer, amp: bool = False):
        super().__init__(model, data_loader, optimizer)
        self.amp = amp
        if amp:
            from torch.cuda.amp import GradScaler

            self.grad_scaler = GradScaler()

    def run_step(self):
        assert self.model.training, "[TaskStepTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        batches = _batches(next(self._data_loader_iter))
        data_time = time.perf_counter() - start

        loss_dict = {}
        with torch.autocast("cuda", enabled=self.amp):
            for b in batches:
                for name, value in self.model(b.inputs).items():
                    loss_dict[f"{b.task_dataset.label}/{name}"] = value
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        if self.amp:
            self.grad_scaler.scale(losses).backward()
        else:
            losses.backward()
        self._write_metrics(loss_dict, data_time)

        mt_adamw = isinstance(self.optimizer, MTAdamW)
        if mt_adamw:
            # one batch: the multi-task loader refuses mixed sampling with MT-AdamW
            td = batches[0].task_dataset
            self.optimizer.set_task(td.sampling_ratio, td.weight)
        if self.amp:
            self.grad_scaler.step(self.optimizer)   # unscales first: the norm is the true one
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        self._write_task_metrics(batches, mt_adamw)

    def _write_metrics(self, loss_dict, data_time: float, prefix: str = "") -> None:
        """SimpleTrainer.write_metrics (the processes' mean of each loss, total_loss, a
        FloatingPointError on a non-finite total), except that every task's losses are put
        even when the task has a single one (detectron2 puts the terms only when there are
        several, so the curve of a one-loss task would be lost)."""
        metrics = {k: v.detach().cpu().item() for k, v in loss_dict.items()}
        metrics["data_time"] = data_time
        gathered = comm.gather(metrics)
        if not comm.is_main_process():
            return
        storage = get_event_storage()
        storage.put_scalar("data_time", max(m.pop("data_time") for m in gathered))
        means = {k: sum(m[k] for m in gathered) / len(gathered) for k in gathered[0]}
        total = sum(means.values())
        if not math.isfinite(total):
            raise FloatingPointError(f"Loss became infinite or NaN at iteration={storage.iter}!\n"
                                     f"loss_dict = {means}")
        storage.put_scalar(f"{prefix}total_loss", total)
        storage.put_scalars(**means)

    def _write_task_metrics(self, batches: List[TaskBatch], mt_adamw: bool) -> None:
        if not comm.is_main_process():
            return
        storage = get_event_storage()
        loader = self.data_loader
        if len(batches) == 1:
            storage.put_scalar("task_drawn", batches[0].index, smoothing_hint=False)
        if mt_adamw and self.optimizer.last_grad_norm is not None:
            storage.put_scalar(f"{batches[0].task_dataset.label}/grad_norm",
                               self.optimizer.last_grad_norm.item(), smoothing_hint=False)
        storage.put_scalars(smoothing_hint=False, **{
            f"{td.label}/times_drawn": n for td, n in zip(loader.task_datasets,
                                                         loader.times_drawn)})

    def state_dict(self):
        ret = super().state_dict()
        if self.amp:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.amp:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
