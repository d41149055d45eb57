"""UniPerceiverV2: detection and instance segmentation through class-name embeddings."""
import pytest
import torch

import unip_v2  # noqa: F401  first: makes detectron2 importable

from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from unip_v2.modeling.text_encoder import train_byte_level_bpe

from test_image_encoder import make_sample, tiny_cfg as tiny_proposal_cfg

NAMES = ["red circle", "green square", "blue triangle"]
TRAIN_SET = "unip_test_uni_perceiver_v2_names"


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    tok = str(tmp_path_factory.mktemp("tok"))
    train_byte_level_bpe(NAMES * 4 + ["a red circle and a blue triangle"] * 4, tok,
                         vocab_size=300, min_frequency=1)
    MetadataCatalog.get(TRAIN_SET).set(thing_classes=NAMES)
    cfg = tiny_proposal_cfg()
    cfg.MODEL.META_ARCHITECTURE = "UniPerceiverV2"
    cfg.DATASETS.TRAIN = (TRAIN_SET,)
    cfg.DATASETS.TEST = (TRAIN_SET,)
    # every query is a proposal: each matched query gets a class loss from the first step
    cfg.MODEL.IMAGE_ENCODER.TOPK_PROPOSALS = cfg.MODEL.IMAGE_ENCODER.NUM_QUERIES
    t = cfg.MODEL.TEXT_ENCODER
    t.TOKENIZER = tok
    t.HIDDEN_SIZE, t.NUM_LAYERS, t.NUM_HEADS, t.INTERMEDIATE_SIZE = 32, 1, 2, 64
    t.MAX_POSITION_EMBEDDINGS, t.CONTEXT_LENGTH, t.OUTPUT_DIM = 34, 16, 64
    d = cfg.MODEL.UNIFIED_DECODER
    d.WIDTH, d.DEPTH, d.NUM_HEADS, d.FFN_DIM, d.DROP_PATH = 64, 1, 2, 128, 0.0
    d.MOE.NUM_EXPERTS = 4
    return cfg


def batch():
    samples = [make_sample(96, 128, [(5, 5, 40, 50), (30, 20, 90, 80)], 0),
               make_sample(96, 128, [(10, 10, 60, 40)], 1)]
    samples[0]["instances"].gt_classes = torch.tensor([0, 2])
    samples[1]["instances"].gt_classes = torch.tensor([1])
    return samples


def test_training_losses_include_the_unified_class_loss(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).train()
    losses = model(batch())
    assert "loss_class" in losses and "loss_ce" in losses
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_class"] > 0
    sum(losses.values()).backward()
    # the class loss reaches the text encoder, the unified decoder and the temperature
    for name in ("text_encoder.roberta.embeddings.word_embeddings.weight",
                 "unified_decoder.spe", "tasks.detection.logit_scale.log_scale"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_inference_instances_and_cached_class_embeddings(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    samples = batch()
    samples[0]["height"], samples[0]["width"] = 192, 256
    with torch.no_grad():
        out = model(samples)
        again = model(samples)
    inst = out[0]["instances"]
    assert inst.image_size == (192, 256) and len(inst) == cfg.TEST.DETECTIONS_PER_IMAGE == 10
    assert inst.pred_masks.shape == (len(inst), 192, 256)
    assert ((inst.pred_classes >= 0) & (inst.pred_classes < len(NAMES))).all()
    assert (inst.scores[:-1] >= inst.scores[1:]).all()
    assert torch.equal(inst.scores, again[0]["instances"].scores)   # eval is deterministic
    assert model.target_bank.num_encodings == 1                     # names encoded once


def _capture(model):
    """Records what the forward pass computed on the way: the image encoder's output, the
    decoded regional features, the class embeddings, and the proposal matches."""
    seen = {}
    model.image_encoder.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    model.target_bank.register_forward_hook(lambda m, i, o: seen.__setitem__("classes", o))
    task = model.tasks["detection"]
    task.criterion.register_forward_hook(
        lambda m, i, o: seen.__setitem__("matches", o[1]) if isinstance(o, tuple) else None)
    region = task.region_features

    def region_features(model_, out):
        seen["feats"] = region(model_, out)
        return seen["feats"]

    task.region_features = region_features
    return seen


def _cosine_logits64(feats, classes, scale):
    f = feats.double() / feats.double().norm(dim=-1, keepdim=True)
    e = classes.double() / classes.double().norm(dim=-1, keepdim=True)
    return scale * f @ e.T


def test_inference_scores_classes_and_boxes_equal_a_float64_oracle(cfg):
    """Inference ("Tasks with Localization"): for each image, all (proposal, class) pairs
    scored by sigmoid(objectness) x softmax over the classes of scale * cos(decoded region,
    class embedding) (Eq. 5), top 10; boxes are the chosen proposals' scaled to the output
    size. The oracle recomputes this in float64 from the captured intermediate values."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    seen = _capture(model)
    samples = batch()
    samples[1]["height"], samples[1]["width"] = 48, 64          # output at half size
    with torch.no_grad():
        results = model(samples)
    out, feats, classes = seen["out"], seen["feats"], seen["classes"]
    scale = model.tasks["detection"].logit_scale().item()
    assert classes.shape == (len(NAMES), 64) and feats.shape == out.regional_tokens.shape
    for b, (res, (oh, ow)) in enumerate(zip(results, [(96, 128), (48, 64)])):
        logits = _cosine_logits64(feats[b], classes, scale)                  # (O, C)
        obj = out.regional_objectness[b].double()
        score = (1 / (1 + torch.exp(-obj)))[:, None] * logits.softmax(-1)
        top = score.flatten().argsort(descending=True)[:10]
        prop, cls = top // len(NAMES), top % len(NAMES)
        inst = res["instances"]
        assert inst.pred_classes.tolist() == cls.tolist()
        torch.testing.assert_close(inst.scores.double(), score.flatten()[top], rtol=1e-5,
                                   atol=1e-7)
        cx, cy, w, h = out.regional_boxes[b, prop].double().unbind(-1)
        want = torch.stack(((cx - w / 2) * ow, (cy - h / 2) * oh, (cx + w / 2) * ow,
                            (cy + h / 2) * oh), -1)
        want = torch.min(want.clamp(min=0), torch.tensor([ow, oh, ow, oh], dtype=torch.float64))
        torch.testing.assert_close(inst.pred_boxes.tensor.double(), want, rtol=1e-5, atol=1e-4)


def test_class_loss_equals_a_float64_cross_entropy_over_matched_proposals(cfg):
    """Training (Eq. 7): loss_class = CLASS_LOSS_WEIGHT x the mean cross-entropy, over the
    C training classes, of scale * cos(decoded region, class embedding) at every query
    matched to a ground truth that made the top O = 12 of 30 proposals, against that
    ground truth's class; float64 oracle from the captured matches and features."""
    cfg = cfg.clone()
    cfg.MODEL.IMAGE_ENCODER.TOPK_PROPOSALS = 12
    cfg.MODEL.DETECTION.CLASS_LOSS_WEIGHT = 2.5
    torch.manual_seed(0)
    model = build_model(cfg).train()
    seen = _capture(model)
    samples = batch()
    torch.manual_seed(1)
    losses = model(samples)
    out, feats, classes = seen["out"], seen["feats"], seen["classes"]
    scale = model.tasks["detection"].logit_scale().item()
    terms = []
    for b, (q, g) in enumerate(seen["matches"]):
        gt = samples[b]["instances"].gt_classes
        for qi, gi in zip(q.tolist(), g.tolist()):
            pos = (out.regional_index[b] == qi).nonzero()
            if len(pos):
                row = _cosine_logits64(feats[b, int(pos[0, 0])].detach(), classes.detach(), scale)
                terms.append(-(row[int(gt[gi])] - torch.logsumexp(row, 0)))
    # both cases occur: 1 of the 3 matched queries made the top O, 2 did not (no loss)
    assert 0 < len(terms) < sum(len(q) for q, _ in seen["matches"])
    want = 2.5 * sum(terms) / len(terms)
    assert losses["loss_class"].item() == pytest.approx(want.item(), rel=1e-5)


def test_test_class_names_replace_the_vocabulary(cfg):
    cfg = cfg.clone()
    cfg.MODEL.DETECTION.TEST_CLASS_NAMES = ["purple pentagon", "red circle"]
    model = build_model(cfg).eval()
    with torch.no_grad():
        inst = model(batch())[0]["instances"]
    assert set(inst.pred_classes.tolist()) <= {0, 1}


def test_widths_must_match(cfg):
    cfg = cfg.clone()
    cfg.MODEL.TEXT_ENCODER.OUTPUT_DIM = 32
    with pytest.raises(ValueError, match="MODEL.TEXT_ENCODER.OUTPUT_DIM=32 must equal"):
        build_model(cfg)


def test_gradients_reach_every_trainable_parameter_over_a_few_steps(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).train()
    # zero-initialised layers block the gradient to what lies before them at step 0 by
    # design (see test_image_encoder.py); perturb them to check that every path is connected
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 1 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    # the MoE gate adds noise in training: over a few steps every expert of every layer is
    # routed to by some segment, so gradients accumulate on all of them
    seen = set()
    for step in range(6):
        torch.manual_seed(step)
        model.zero_grad()
        sum(model(batch()).values()).backward()
        seen |= {n for n, p in model.named_parameters()
                 if p.grad is not None and p.grad.abs().sum() > 0}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in seen]
    assert missing == []


def test_losses_and_outputs_float32_under_autocast(cfg):
    """The model runs under autocast (SOLVER.AMP.ENABLED on CUDA; bf16 here on CPU): the
    losses and the matcher stay float32, outputs carry float32 scores and boxes, and the
    values stay close to the float32 run's (the class loss within 5 %, the top score within
    10 %: bf16 keeps 8 bits of mantissa)."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    torch.manual_seed(5)
    reference = model(batch())["loss_class"].item()
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert losses["loss_class"].item() == pytest.approx(reference, rel=0.05)
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
    model.eval()
    with torch.no_grad():
        top = model(batch())[0]["instances"].scores[0].item()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        inst = model(batch())[0]["instances"]
    assert inst.scores.dtype == inst.pred_boxes.tensor.dtype == torch.float32
    assert inst.pred_masks.dtype == torch.bool and len(inst) == cfg.TEST.DETECTIONS_PER_IMAGE
    assert inst.scores[0].item() == pytest.approx(top, rel=0.1)
