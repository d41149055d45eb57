"""The optimiser: learning-rate multipliers and weight-decay rules per parameter, gradient
clipping over the whole model, and the AMP switch of the Trainer."""
import os

import pytest
import torch
from torch import nn

import unip_v2  # noqa: F401  (first: makes detectron2 importable)

from detectron2.config import get_cfg

from unip_v2 import add_unip_v2_config
from unip_v2.engine import Trainer
from unip_v2.modeling.tasks import LogitScale
from unip_v2.solver import build_optimizer
from unip_v2.solver.build import optimizer_param_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def solver_cfg(**solver):
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "Base-UniPerceiverV2.yaml"))
    cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY = 1.0, 0.5
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.IMAGE_ENCODER_MULTIPLIER = 0.2
    cfg.SOLVER.TEXT_ENCODER_MULTIPLIER = 0.3
    for k, v in solver.items():
        setattr(cfg.SOLVER, k, v)
    return cfg


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.spe = nn.Parameter(torch.zeros(1, 4))
        self.type_embed = nn.Embedding(3, 4)
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.fc1_bias = nn.Parameter(torch.zeros(2, 4))   # MoE expert biases


def model_like_uni_perceiver_v2():
    """The parameter names the rules key on, on small modules."""
    m = nn.Module()
    m.image_encoder = nn.Module()
    m.image_encoder.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    m.image_encoder.head = nn.Linear(4, 4)
    m.image_encoder.level_embed = nn.Parameter(torch.zeros(2, 4))
    m.text_encoder = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4))
    m.unified_decoder = Decoder()
    m.logit_scale = LogitScale()
    m.frozen = nn.Linear(2, 2)
    m.frozen.requires_grad_(False)
    return m


def groups_by_name(cfg, model):
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in optimizer_param_groups(cfg, model):
        (p,) = g["params"]
        assert by_id[id(p)] not in out, "each parameter in one group only"
        out[by_id[id(p)]] = (round(g["lr"], 9), g["weight_decay"])
    return out


def test_learning_rate_multipliers_and_weight_decay_rules():
    got = groups_by_name(solver_cfg(), model_like_uni_perceiver_v2())
    assert got == {
        "image_encoder.backbone.0.weight": (0.1, 0.5),
        "image_encoder.backbone.0.bias": (0.1, 0.0),       # bias
        "image_encoder.backbone.1.weight": (0.1, 0.0),     # norm
        "image_encoder.backbone.1.bias": (0.1, 0.0),
        "image_encoder.head.weight": (0.2, 0.5),
        "image_encoder.head.bias": (0.2, 0.0),
        "image_encoder.level_embed": (0.2, 0.0),           # embedding
        "text_encoder.0.weight": (0.3, 0.0),               # nn.Embedding
        "text_encoder.1.weight": (0.3, 0.5),
        "text_encoder.1.bias": (0.3, 0.0),
        "unified_decoder.spe": (1.0, 0.0),                 # <SPE>
        "unified_decoder.fc1_bias": (1.0, 0.0),
        "unified_decoder.type_embed.weight": (1.0, 0.0),
        "unified_decoder.fc.weight": (1.0, 0.5),
        "unified_decoder.fc.bias": (1.0, 0.0),
        "unified_decoder.norm.weight": (1.0, 0.0),
        "unified_decoder.norm.bias": (1.0, 0.0),
        "logit_scale.log_scale": (1.0, 0.0),               # temperature
    }                                                      # frozen: no group


def test_bias_decay_follows_weight_decay_when_unset_and_embed_decay_is_a_knob():
    got = groups_by_name(solver_cfg(WEIGHT_DECAY_BIAS=None, WEIGHT_DECAY_EMBED=0.25),
                         model_like_uni_perceiver_v2())
    assert got["unified_decoder.fc.bias"][1] == got["unified_decoder.fc1_bias"][1] == 0.5
    assert got["unified_decoder.spe"][1] == got["text_encoder.0.weight"][1] == 0.25
    assert got["logit_scale.log_scale"][1] == 0.0 and got["unified_decoder.norm.bias"][1] == 0.0


def test_shared_parameter_is_optimised_once():
    m = model_like_uni_perceiver_v2()
    m.unified_decoder.tied = m.unified_decoder.fc     # the same Linear under two names
    groups = optimizer_param_groups(solver_cfg(), m)
    params = [g["params"][0] for g in groups]
    assert len(params) == len({id(p) for p in params}) == sum(
        1 for p in m.parameters() if p.requires_grad)


def test_full_model_clipping_bounds_the_global_norm():
    cfg = solver_cfg(OPTIMIZER="SGD", MOMENTUM=0.0, WEIGHT_DECAY=0.0)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED, cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = True, "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    cfg.SOLVER.BACKBONE_MULTIPLIER = cfg.SOLVER.IMAGE_ENCODER_MULTIPLIER = 1.0
    cfg.SOLVER.TEXT_ENCODER_MULTIPLIER = 1.0
    m = model_like_uni_perceiver_v2()
    opt = build_optimizer(cfg, m)
    before = [p.detach().clone() for p in m.parameters()]
    for p in m.parameters():
        p.grad = torch.full_like(p, 3.0)
    opt.step()
    # plain SGD at lr 1: the update is the clipped gradient, whose global norm is 0.01
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, m.parameters())])
    assert step.norm().item() == pytest.approx(0.01, rel=1e-4)


@pytest.mark.parametrize("optimizer", ["ADAMW", "SGD"])
def test_merged_groups_give_the_per_parameter_update(optimizer):
    """build_optimizer steps parameters with equal hyperparameters together (fused or foreach):
    three steps must equal torch's one-parameter-at-a-time implementation over the
    per-parameter groups, each parameter keeping its own lr and weight decay."""
    cfg = solver_cfg(OPTIMIZER=optimizer, MOMENTUM=0.9)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED, cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = True, "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    torch.manual_seed(0)
    fast, slow = model_like_uni_perceiver_v2(), model_like_uni_perceiver_v2()
    slow.load_state_dict(fast.state_dict())
    opt = build_optimizer(cfg, fast)
    assert len(opt.param_groups) < len(optimizer_param_groups(cfg, fast))
    if optimizer == "ADAMW":
        ref = torch.optim.AdamW(optimizer_param_groups(cfg, slow), lr=1.0, betas=(0.9, 0.999),
                                foreach=False)
    else:
        ref = torch.optim.SGD(optimizer_param_groups(cfg, slow), lr=1.0, momentum=0.9,
                              foreach=False)
    trainable = [(a, b) for a, b in zip(fast.parameters(), slow.parameters()) if a.requires_grad]
    for step in range(3):
        grads = [torch.randn_like(a) * (step + 1) for a, _ in trainable]
        for (a, b), g in zip(trainable, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        # the clipping by hand: global norm over all gradients, scaled down to 0.5
        scale = min(1.0, 0.5 / (torch.cat([g.flatten() for g in grads]).norm().item() + 1e-6))
        for _, b in trainable:
            b.grad.mul_(scale)
        ref.step()
    for a, b in trainable:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER must be 'ADAMW' or 'SGD', got 'LAMB'"):
        build_optimizer(solver_cfg(OPTIMIZER="LAMB"), model_like_uni_perceiver_v2())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_amp_without_cuda_is_a_clear_error():
    cfg = solver_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.SOLVER.AMP.ENABLED = True
    with pytest.raises(ValueError, match="SOLVER.AMP.ENABLED needs a CUDA device"):
        Trainer(cfg)
