"""The optimiser: learning-rate multipliers and weight-decay rules per parameter, gradient
clipping over the whole model, and the AMP switch of the Trainer."""
import os
import re

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

import config_models

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

    def weight_decay_kinds(self):
        return {"spe": "embed"}


class ImageEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 4)
        self.level_embed = nn.Parameter(torch.zeros(2, 4))

    def weight_decay_kinds(self):
        return {"level_embed": "embed"}


class ModelLikeUniPerceiverV2(nn.Module):
    """The optimiser's protocol on small modules: the model lists its (module, LR
    multiplier) pairs, modules declare their embeddings and never-decayed parameters."""

    def __init__(self):
        super().__init__()
        self.image_encoder = ImageEncoder()
        self.text_encoder = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4))
        self.unified_decoder = Decoder()
        self.logit_scale = LogitScale()
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def lr_multiplier_modules(self, cfg):
        s = cfg.SOLVER
        return [(self.image_encoder.backbone, s.BACKBONE_MULTIPLIER),
                (self.image_encoder, s.IMAGE_ENCODER_MULTIPLIER),
                (self.text_encoder, s.TEXT_ENCODER_MULTIPLIER)]


def model_like_uni_perceiver_v2():
    return ModelLikeUniPerceiverV2()


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
    m.unified_decoder.out = nn.Linear(4, 5, bias=False)
    m.unified_decoder.out.weight = m.text_encoder[0].weight      # tied (5, 4) embedding
    groups = optimizer_param_groups(solver_cfg(), m)
    params = [g["params"][0] for g in groups]
    # one tensor tied between two different modules (an embedding and an output layer)
    assert len(params) == len({id(p) for p in params}) == sum(
        1 for p in m.parameters() if p.requires_grad)
    opt = build_optimizer(solver_cfg(), m)   # torch refuses a parameter in two groups
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)


def test_a_norm_layer_outside_the_usual_classes_gets_the_norm_rule():
    """torch's RMSNorm is a normalisation layer too: no weight decay on its scale (the
    solver recognises norm layers by class name as well as by the common classes)."""
    m = model_like_uni_perceiver_v2()
    m.unified_decoder.rms = nn.RMSNorm(4)
    got = groups_by_name(solver_cfg(WEIGHT_DECAY_NORM=0.125), m)
    assert got["unified_decoder.rms.weight"] == (1.0, 0.125)
    assert got["unified_decoder.norm.weight"] == (1.0, 0.125)
    assert got["unified_decoder.fc.weight"] == (1.0, 0.5)


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


def _built_and_twin(**solver):
    """(cfg with full-model clipping at 0.5, model, its twin with equal weights, build_optimizer
    of the model); the optimiser must merge the per-parameter groups."""
    cfg = solver_cfg(**solver)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED, cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = True, "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.5
    torch.manual_seed(0)
    fast, slow = model_like_uni_perceiver_v2(), model_like_uni_perceiver_v2()
    slow.load_state_dict(fast.state_dict())
    opt = build_optimizer(cfg, fast)
    assert len(opt.param_groups) < len(optimizer_param_groups(cfg, fast))
    return cfg, fast, slow, opt


@pytest.mark.parametrize("optimizer", ["ADAMW", "SGD"])
def test_merged_groups_give_the_per_parameter_update(optimizer):
    """build_optimizer steps parameters with equal hyperparameters together (fused or foreach):
    three steps must equal torch's one-parameter-at-a-time implementation over the
    per-parameter groups, each parameter keeping its own lr and weight decay."""
    cfg, fast, slow, opt = _built_and_twin(OPTIMIZER=optimizer, MOMENTUM=0.9)
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


def test_mt_adamw_from_the_config_steps_the_models_groups():
    """SOLVER.OPTIMIZER MT-ADAMW: the model's groups (lr multipliers, decay rules), merged; with
    s_k = w_k = 1 and unit-norm gradients, three steps equal torch's AdamW one parameter at a
    time. Full-model clipping (here at 0.5, below the unit norm) is not applied: MT-AdamW
    normalises the gradient itself."""
    from unip_v2.solver import MTAdamW

    cfg, fast, slow, opt = _built_and_twin(OPTIMIZER="MT-ADAMW")
    assert isinstance(opt, MTAdamW)
    ref = torch.optim.AdamW(optimizer_param_groups(cfg, slow), lr=1.0, betas=(0.9, 0.999),
                            foreach=False)
    trainable = [(a, b) for a, b in zip(fast.parameters(), slow.parameters()) if a.requires_grad]
    for step in range(3):
        grads = [torch.randn_like(a) for a, _ in trainable]
        norm = torch.cat([g.flatten() for g in grads]).norm()
        for (a, b), g in zip(trainable, grads):
            a.grad, b.grad = g / norm, g / norm
        opt.set_task(1.0, 1.0)
        opt.step()
        ref.step()
    for a, b in trainable:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER must be 'ADAMW', 'MT-ADAMW' or 'SGD', got 'LAMB'"):
        build_optimizer(solver_cfg(OPTIMIZER="LAMB"), model_like_uni_perceiver_v2())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_amp_without_cuda_is_a_clear_error():
    cfg = solver_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.SOLVER.AMP.ENABLED = True
    with pytest.raises(ValueError, match="SOLVER.AMP.ENABLED needs a CUDA device"):
        Trainer(cfg)


# ------------------------------------------ the rules on the models the configs build
# The rules of README's "Optimiser" paragraph, written here from parameter NAMES (the solver
# decides from module types and names): no weight decay on normalisation layers, biases,
# embeddings (<SPE>, queries, level, position, type and word embeddings, the denoising label
# embedding, Swin's relative position tables) and the temperature; the backbone's learning
# rate x BACKBONE_MULTIPLIER, the rest of f_image x IMAGE_ENCODER_MULTIPLIER, f_text x
# TEXT_ENCODER_MULTIPLIER (Uni-Perceiver v2, Sec. 5.2: pretrained encoders at 0.1x).
_NORM_NAME = re.compile(
    r"(^|\.)\w*norm\d*\.(weight|bias)$"               # norm, norm1, LayerNorm, tag_norm, ...
    r"|\.input_proj\.\d+\.1\.(weight|bias)$",         # (1x1 conv, GroupNorm) pairs
    re.IGNORECASE)
_EMBED_MODULES = {"query_embed", "label_enc", "type_embed", "word_embeddings",
                  "position_embeddings", "token_type_embeddings"}
_EMBED_PARAMS = {"spe", "queries", "level_embed", "relative_position_bias_table"}
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _decay_class(name):
    *modules, last = name.split(".")
    if _NORM_NAME.search(name):
        return "norm"
    if name.endswith("logit_scale.log_scale"):   # one temperature per task
        return "temperature"
    if last in _EMBED_PARAMS or (modules and modules[-1] in _EMBED_MODULES and last == "weight"):
        return "embedding"
    if last == "bias" or last.endswith("_bias"):
        return "bias"
    return "weight"


def _lr_class(name):
    if name.startswith("image_encoder.backbone."):
        return "backbone"
    if name.startswith("image_encoder."):
        return "image_encoder"
    if name.startswith("text_encoder."):
        return "text_encoder"
    return "rest"


def _optimizer_groups(cfg, model):
    """{parameter name: (lr, weight_decay)} read from the optimiser the Trainer builds, after
    it merged the groups; every trainable parameter must be in exactly one group."""
    optimizer = Trainer.build_optimizer(cfg, model)
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    got = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]   # KeyError: a frozen or foreign tensor in the optimiser
            assert name not in got, f"{name} is in two optimiser groups"
            got[name] = (group["lr"], group["weight_decay"])
    assert set(got) == set(names.values()), sorted(set(names.values()) - set(got))[:5]
    return got


def _class_sentinels(cfg):
    """Distinct values per rule class, so each parameter's class is read off its group."""
    s = cfg.SOLVER
    s.BASE_LR, s.BACKBONE_MULTIPLIER, s.IMAGE_ENCODER_MULTIPLIER = 1.0, 0.125, 0.25
    s.TEXT_ENCODER_MULTIPLIER = 0.5
    s.WEIGHT_DECAY, s.WEIGHT_DECAY_NORM, s.WEIGHT_DECAY_EMBED, s.WEIGHT_DECAY_BIAS = (
        0.5, 0.01, 0.02, 0.03)
    lr = {"backbone": 0.125, "image_encoder": 0.25, "text_encoder": 0.5, "rest": 1.0}
    wd = {"weight": 0.5, "norm": 0.01, "embedding": 0.02, "bias": 0.03, "temperature": 0.0}
    return lr, wd


_ALL_CONFIGS = config_models.PAPER_CONFIGS + config_models.TOY_CONFIGS


def test_the_name_rules_agree_with_the_module_types():
    """The test's name patterns pick exactly the parameters of torch's norm layers and of
    nn.Embedding (plus the README's named embedding tensors), on every config's model: the
    rules below are about the real names, not a mock's."""
    for path in _ALL_CONFIGS:
        model = config_models.meta_model(path)
        for module_name, module in model.named_modules():
            for short, _ in module.named_parameters(recurse=False):
                name = f"{module_name}.{short}" if module_name else short
                is_norm = isinstance(module, _NORM_TYPES)
                assert (_decay_class(name) == "norm") == is_norm, (path, name)
                if isinstance(module, nn.Embedding):
                    assert _decay_class(name) == "embedding", (path, name)


@pytest.mark.parametrize("path", _ALL_CONFIGS)
def test_every_parameter_of_a_config_model_gets_its_rule(path):
    """Each trainable parameter's (lr, weight decay) in the built optimiser is the one its
    name's rule class gives (sentinel values per class), and every class that the model has
    parameters for is met (a rule that never matches a real name fails here)."""
    cfg = config_models.load_config(path)
    lr, wd = _class_sentinels(cfg)
    model = config_models.meta_model(path)
    got = _optimizer_groups(cfg, model)
    wrong = [(name, got[name], (lr[_lr_class(name)], wd[_decay_class(name)]))
             for name in got
             if got[name] != pytest.approx((lr[_lr_class(name)], wd[_decay_class(name)]))]
    assert wrong == [], wrong[:8]
    counts = {}
    for name in got:
        for key in (_lr_class(name), _decay_class(name)):
            counts[key] = counts.get(key, 0) + 1
    generalist = "uni_perceiver_v2" in path
    expected = {"backbone", "image_encoder", "weight", "norm", "embedding", "bias"}
    if generalist:
        expected |= {"text_encoder", "rest", "temperature"}
        assert counts["temperature"] == 1
    assert set(counts) == expected, counts
    if "Swin" in path:   # one relative position table per Swin block: 2 + 2 + 18 + 2
        assert sum(n.endswith("relative_position_bias_table") for n in got) == 24
    if generalist:       # MoE expert biases: fc1 and fc2 per unified decoder layer
        depth = cfg.MODEL.UNIFIED_DECODER.DEPTH
        assert sum(n.endswith(("ffn.fc1_bias", "ffn.fc2_bias")) for n in got) == 2 * depth
        assert all(got[n][1] == 0.03 for n in got if n.endswith("_bias"))


# Uni-Perceiver v2, Sec. 5.2: AdamW, learning rate 1e-4, weight decay 1e-4, pretrained
# encoders (backbone, RoBERTa) at 0.1x; the proposal network trains from scratch (1x).
# Mask DINO (the proposal network alone): learning rate 1e-4, weight decay 0.05, backbone 0.1x.
# The toy models train everything from scratch at 10x the paper's rate, weight decay 0.05.
_PAPER_SOLVER = {
    "uni_perceiver_v2/R50.yaml": (1e-4, 1e-4, {"backbone": 1e-5, "image_encoder": 1e-4,
                                               "text_encoder": 1e-5, "rest": 1e-4}),
    "uni_perceiver_v2/Swin-B.yaml": (1e-4, 1e-4, {"backbone": 1e-5, "image_encoder": 1e-4,
                                                  "text_encoder": 1e-5, "rest": 1e-4}),
    "uni_perceiver_v2/Swin-L.yaml": (1e-4, 1e-4, {"backbone": 1e-5, "image_encoder": 1e-4,
                                                  "text_encoder": 1e-5, "rest": 1e-4}),
    "proposal_network/R50_coco.yaml": (1e-4, 0.05, {"backbone": 1e-5, "image_encoder": 1e-4}),
    "toy/uni_perceiver_v2_R50_tiny.yaml": (1e-3, 0.05, {"backbone": 1e-3, "image_encoder": 1e-3,
                                                        "text_encoder": 1e-3, "rest": 1e-3}),
    "toy/proposal_network_R50_tiny.yaml": (1e-3, 0.05, {"backbone": 1e-3,
                                                        "image_encoder": 1e-3}),
}


@pytest.mark.parametrize("path", sorted(_PAPER_SOLVER))
def test_config_optimiser_has_the_paper_values(path):
    """With the config's own solver keys: AdamW; each parameter's learning rate is the
    paper's for its part of the model; weight decay is the paper's on weights and 0 on norms,
    biases, embeddings and the temperature (values written here, not read from the file)."""
    base_lr, weight_decay, lr_by_part = _PAPER_SOLVER[path]
    cfg = config_models.load_config(path)
    model = config_models.meta_model(path)
    assert cfg.SOLVER.OPTIMIZER == "ADAMW" and cfg.SOLVER.BASE_LR == pytest.approx(base_lr)
    got = _optimizer_groups(cfg, model)
    for name, (lr, wd) in got.items():
        assert lr == pytest.approx(lr_by_part[_lr_class(name)], rel=1e-9), name
        want_wd = weight_decay if _decay_class(name) == "weight" else 0.0
        assert wd == pytest.approx(want_wd, rel=1e-9), name
    assert isinstance(Trainer.build_optimizer(cfg, model), torch.optim.AdamW)


def test_the_real_toy_model_on_the_cpu_gets_the_same_groups():
    """The toy generalist built for real (CPU tensors, as training builds it) gets the same
    groups as its meta-device twin above, spot-checked on a few named parameters."""
    from detectron2.modeling import build_model

    cfg = config_models.load_config("toy/uni_perceiver_v2_R50_tiny.yaml")
    lr, wd = _class_sentinels(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    got = _optimizer_groups(cfg, model)
    assert got == _optimizer_groups(cfg, config_models.meta_model(
        "toy/uni_perceiver_v2_R50_tiny.yaml"))
    assert got["image_encoder.backbone.stem.conv1.weight"] == (0.125, 0.5)
    assert got["image_encoder.backbone.stem.conv1.norm.weight"] == (0.125, 0.01)   # BN
    assert got["image_encoder.pixel_encoder.input_proj.0.1.weight"] == (0.25, 0.01)  # GN
    assert got["image_encoder.pixel_encoder.level_embed"] == (0.25, 0.02)
    assert got["image_encoder.proposal_decoder.query_embed.weight"] == (0.25, 0.02)
    assert got["image_encoder.proposal_decoder.class_embed.weight"] == (0.25, 0.5)  # a Linear
    assert got["image_encoder.global_tokens.queries"] == (0.25, 0.02)
    assert got["text_encoder.roberta.embeddings.word_embeddings.weight"] == (0.5, 0.02)
    assert got["unified_decoder.spe"] == (1.0, 0.02)
    assert got["unified_decoder.layers.0.ffn.fc1_bias"] == (1.0, 0.03)
    assert got["unified_decoder.layers.0.ffn.fc1_weight"] == (1.0, 0.5)
    assert got["image_encoder.proposal_decoder.decoder.layers.0.self_attn.in_proj_bias"] == (
        0.25, 0.03)
    assert got["tasks.detection.logit_scale.log_scale"] == (1.0, 0.0)
