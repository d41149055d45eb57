"""MT-AdamW (Uni-Perceiver v2, Sec. 4.4) against independent oracles: torch's AdamW where the
two must agree, a float64 hand computation of the formula for two tasks, and the invariance
the normalisation promises."""
import copy
import math

import pytest
import torch

import unip_v2  # noqa: F401

from unip_v2.solver import MTAdamW

# both implementations of the rule: the compiled CPU kernel and torch's foreach ops
IMPLEMENTATIONS = pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=g).requires_grad_(), torch.randn(5, generator=g)
            .requires_grad_(), torch.randn(2, 2, generator=g).requires_grad_()]


def _groups(params):
    return [{"params": params[:2], "lr": 0.01, "weight_decay": 0.1},
            {"params": params[2:], "lr": 0.003, "weight_decay": 0.0}]


@IMPLEMENTATIONS
def test_equals_torch_adamw_with_unit_weights_and_unit_norm_gradients(fused):
    ours, ref = _params(), _params()
    opt = MTAdamW(_groups(ours), betas=(0.9, 0.95), eps=1e-6, fused=fused)
    torch_opt = torch.optim.AdamW(_groups(ref), betas=(0.9, 0.95), eps=1e-6, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        norm = math.sqrt(sum(float((x.double() ** 2).sum()) for x in grads))
        for p, q, x in zip(ours, ref, grads):
            p.grad, q.grad = x / norm, (x / norm).clone()
        opt.set_task(1.0, 1.0)
        opt.step()
        torch_opt.step()
        assert opt.last_grad_norm.item() == pytest.approx(1.0, rel=1e-6)
    for p, q in zip(ours, ref):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), (p - q).abs().max()


def _hand_mt_adamw(p0, grads, tasks, lr, b1, b2, eps, wd):
    """The formula of the paper in standard notation, float64, one scalar at a time."""
    p = [[float(v) for v in t.flatten()] for t in p0]
    m = [[0.0] * len(t) for t in p]
    v = [[0.0] * len(t) for t in p]
    for t, (step_grads, (s, w)) in enumerate(zip(grads, tasks), start=1):
        flat = [[float(x) for x in gr.flatten()] for gr in step_grads]
        norm = math.sqrt(sum(x * x for gr in flat for x in gr))
        for i in range(len(p)):
            for j in range(len(p[i])):
                gk = w * flat[i][j] / norm
                m[i][j] = b1 * m[i][j] + (1 - b1) * gk / s
                v[i][j] = b2 * v[i][j] + (1 - b2) * gk * gk / s
                m_hat = m[i][j] / (1 - b1 ** t)
                v_hat = v[i][j] / (1 - b2 ** t)
                p[i][j] = p[i][j] * (1 - lr * wd) - lr * m_hat / (math.sqrt(v_hat) + eps)
    return p


@IMPLEMENTATIONS
def test_three_steps_with_two_tasks_match_a_hand_computation(fused):
    torch.set_default_dtype(torch.float64)
    try:
        params = [torch.tensor([0.5, -1.0, 2.0], requires_grad=True),
                  torch.tensor([[0.25, 3.0]], requires_grad=True)]
        p0 = [p.detach().clone() for p in params]
        grads = [[torch.tensor([0.3, -0.2, 0.1]), torch.tensor([[2.0, -0.5]])],
                 [torch.tensor([-4.0, 1.0, 0.0]), torch.tensor([[0.0, 3.0]])],
                 [torch.tensor([0.01, 0.02, -0.03]), torch.tensor([[0.05, 0.0]])]]
        tasks = [(0.75, 1.0), (0.25, 0.5), (0.75, 1.0)]     # task A, task B, task A
        opt = MTAdamW(params, lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05,
                      fused=fused)
        for step_grads, (s, w) in zip(grads, tasks):
            for p, gr in zip(params, step_grads):
                p.grad = gr.clone()
            opt.set_task(s, w)
            opt.step()
        expected = _hand_mt_adamw(p0, grads, tasks, 0.1, 0.9, 0.99, 1e-8, 0.05)
        for p, e in zip(params, expected):
            assert p.detach().flatten().tolist() == pytest.approx(e, rel=1e-12, abs=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def _updates(make_opt, scale_a):
    """Four steps alternating task A (s 0.3, w 1) and task B (s 0.7, w 0.4), task A's loss
    multiplied by scale_a; the parameters after them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = make_opt(model.parameters())
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    for step in range(4):
        out = model(x)
        if step % 2 == 0:
            loss, s, w = out.pow(2).mean() * scale_a, 0.3, 1.0
        else:
            loss, s, w = (out - y).abs().mean(), 0.7, 0.4
        opt.zero_grad()
        loss.backward()
        if isinstance(opt, MTAdamW):
            opt.set_task(s, w)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@IMPLEMENTATIONS
def test_a_task_loss_times_1000_leaves_the_update_unchanged(fused):
    def mt(params):
        return MTAdamW(params, lr=0.05, weight_decay=0.01, fused=fused)

    assert (mt([torch.zeros(1, requires_grad=True)])._kernel is not None) == fused
    for a, b in zip(_updates(mt, 1.0), _updates(mt, 1000.0)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)

    # the check can fail: torch's AdamW, whose moments mix the two tasks' raw gradients,
    # moves differently when one task's loss is 1000x larger
    def adamw(params):
        return torch.optim.AdamW(params, lr=0.05, weight_decay=0.01)

    moved = [(a - b).abs().max().item() for a, b in zip(_updates(adamw, 1.0),
                                                       _updates(adamw, 1000.0))]
    assert max(moved) > 1e-3


@IMPLEMENTATIONS
def test_parameters_without_gradient_are_left_alone_and_state_round_trips(fused):
    params = _params(3)
    opt = MTAdamW(_groups(params), weight_decay=0.5, fused=fused)
    frozen = params[2].detach().clone()
    g = torch.Generator().manual_seed(4)
    for k in range(2):
        for p in params[:2]:
            p.grad = torch.randn(p.shape, generator=g)
        opt.set_task(0.5, 2.0)
        opt.step()
    assert torch.equal(params[2], frozen) and params[2] not in opt.state   # no grad: untouched
    # state_dict round trip: a fresh optimiser that loads it continues exactly
    twin = [p.detach().clone().requires_grad_() for p in params]
    twin_opt = MTAdamW(_groups(twin), weight_decay=0.5, fused=fused)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert twin_opt.state[twin[0]]["step"] == 2
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for opt_, ps in ((opt, params), (twin_opt, twin)):
            for p, x in zip(ps, grads):
                p.grad = x.clone()
            opt_.set_task(0.25, 1.0)
            opt_.step()
    for p, q in zip(params, twin):
        assert torch.equal(p, q)


def test_bad_task_settings_are_refused():
    opt = MTAdamW(_params())
    with pytest.raises(ValueError, match="sampling ratio"):
        opt.set_task(0.0, 1.0)
    with pytest.raises(ValueError, match="task weight"):
        opt.set_task(0.5, -1.0)
