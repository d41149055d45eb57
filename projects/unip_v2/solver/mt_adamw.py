"""MT-AdamW (Uni-Perceiver v2, Sec. 4.4; "Task-Balanced Gradient Normalization" in the CVPR
text): AdamW for unmixed multi-task training, where every step trains the one task k drawn
with probability s_k.

In standard AdamW notation (the paper writes (1 - b) where AdamW writes b; the same rule),
with task k sampled at step t and grad the gradient of this step (after DDP has averaged it
across processes; under AMP after the scaler has unscaled it):

    g   = w_k * grad / ||grad||              (||.||: the L2 norm over every parameter)
    m   = b1 * m + (1 - b1) * g / s_k
    v   = b2 * v + (1 - b2) * g^2 / s_k
    p  *= 1 - lr * weight_decay              (decoupled weight decay)
    p  -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

The normalisation makes every step's update independent of its task's loss scale; w_k then
sets the task's weight, and 1 / s_k compensates for how rarely the task is drawn, so that a
task's expected contribution to the moments is w_k whatever its sampling ratio. With s_k = w_k
= 1 and a gradient of unit norm this is torch's AdamW, step for step.

The paper leaves open (and this module decides):
- the norm is global over all parameters of the step (not per parameter or per group);
- bias correction and weight decay are AdamW's (the paper omits them "for simplicity"); the
  step count t is per parameter, counting the steps in which the parameter had a gradient,
  as in torch's AdamW (a task-specific head is stepped only when its task is drawn);
- eps is outside the square root (AdamW's and the CVPR text's form).

`set_task(sampling_ratio, weight)` before each `step()` names the task drawn; the trainer does
it (engine/multitask.py). Parameters without a gradient this step (the other tasks' heads)
are left untouched, moments included, as torch's AdamW leaves them.

Two implementations of the same rule: on CPU float32 / float64 parameters, one fused pass per
parameter in the compiled extension (csrc/cpu/mt_adamw_cpu.cpp; torch has no fused kernel to
reuse, since the two moments need the gradient scaled differently); elsewhere (CUDA, half
precision, a build without the extension) torch's multi-tensor (foreach) ops. ``fused=None``
picks the first where it applies; tests run both.
"""
import math
from typing import Optional

import torch

__all__ = ["MTAdamW"]


class MTAdamW(torch.optim.Optimizer):
    """MT-AdamW over parameter groups with per-group lr and weight_decay (see the module
    docstring for the rule). `last_grad_norm`: the global gradient norm of the last step, a
    0-d tensor on the parameters' device (reading it syncs; the trainer logs it)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, fused: Optional[bool] = None):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"MTAdamW: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, "
                             f"{weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"MTAdamW: betas must lie in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        self.sampling_ratio, self.task_weight = 1.0, 1.0
        self.last_grad_norm: Optional[torch.Tensor] = None
        kernel = _fused_cpu_kernel()
        if fused and kernel is None:
            raise RuntimeError("MTAdamW(fused=True) needs unip_v2._C with mt_adamw_step_cpu: "
                               "rebuild the extension (make install)")
        self._kernel = None if fused is False else kernel

    def set_task(self, sampling_ratio: float, weight: float) -> None:
        """The task of the next step: its sampling ratio s_k in (0, 1] and weight w_k > 0."""
        if not 0.0 < sampling_ratio <= 1.0:
            raise ValueError(f"MTAdamW.set_task: the sampling ratio s_k must lie in (0, 1], "
                             f"got {sampling_ratio}")
        if not weight > 0.0:
            raise ValueError(f"MTAdamW.set_task: the task weight w_k must be > 0, got {weight}")
        self.sampling_ratio, self.task_weight = float(sampling_ratio), float(weight)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        if not grads:
            return loss
        if any(g.is_sparse for g in grads):
            raise NotImplementedError("MTAdamW does not support sparse gradients")
        # Global L2 norm: one norm per tensor (foreach), then the norm of those. A zero
        # gradient (nothing to learn from this batch) leaves the moments' input zero rather
        # than 0/0; the clamp keeps the whole step free of host syncs.
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        norm = torch.linalg.vector_norm(
            torch.stack([n.to(dtype) for n in torch._foreach_norm(grads)]))
        self.last_grad_norm = norm
        scale = self.task_weight / norm.clamp_min(torch.finfo(norm.dtype).tiny)
        inv_s = 1.0 / self.sampling_ratio
        scale_value = None     # the fused kernel takes a Python number: one read per step
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p,
                                                           memory_format=torch.contiguous_format)
                state["step"] += 1
            if self._kernel is not None and all(_fusable(p, self.state[p]) for p in params):
                if scale_value is None:
                    scale_value = float(scale)
                self._step_fused(group, params, scale_value, inv_s)
            else:
                self._step_foreach(group, params, scale, inv_s)
        return loss

    def _step_fused(self, group, params, scale: float, inv_s: float) -> None:
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        steps = [self.state[p]["step"] for p in params]
        self._kernel(params, [p.grad for p in params],
                     [self.state[p]["exp_avg"] for p in params],
                     [self.state[p]["exp_avg_sq"] for p in params],
                     [lr / (1.0 - b1 ** t) for t in steps],
                     [1.0 / math.sqrt(1.0 - b2 ** t) for t in steps],
                     scale, b1, b2, (1.0 - b1) * inv_s, (1.0 - b2) * inv_s, 1.0 - lr * wd, eps)

    def _step_foreach(self, group, params, scale: torch.Tensor, inv_s: float) -> None:
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        # Multi-tensor (foreach) ops: one kernel launch per op for the whole group, not one
        # per parameter (torch's AdamW does the same).
        g = torch._foreach_mul([p.grad for p in params], scale.to(params[0].device))
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, g, alpha=(1.0 - b1) * inv_s)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, g, g, value=(1.0 - b2) * inv_s)
        if wd != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        steps = [self.state[p]["step"] for p in params]
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1.0 - b2 ** t) for t in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, m, denom, [-lr / (1.0 - b1 ** t) for t in steps])


def _fused_cpu_kernel():
    """unip_v2._C.mt_adamw_step_cpu, or None where the extension lacks it."""
    try:
        from .. import _C
    except ImportError:
        return None
    return getattr(_C, "mt_adamw_step_cpu", None)


def _fusable(p: torch.Tensor, state) -> bool:
    """The compiled kernel's domain: contiguous CPU float32 / float64 tensors, dense gradient."""
    tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
    return (p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64)
            and all(t.is_contiguous() and t.dtype == p.dtype and t.layout == torch.strided
                    for t in tensors))
