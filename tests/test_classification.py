"""Image classification (Uni-Perceiver v2, Sec. 4.3): the image's <SPE> output against the
decoded category names, cross-entropy with label smoothing, top-1 / top-5 accuracy; the
mapper's crops and its bad input."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import unip_v2  # noqa: F401  first: makes detectron2 importable

from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from unip_v2.data.dataset_mappers import ClassificationDatasetMapper
from unip_v2.evaluation import ClassificationEvaluator

from test_uni_perceiver_v2 import NAMES, cfg as detection_cfg  # noqa: F401  (tiny generalist)

CLS_SET = "unip_test_classification_names"


@pytest.fixture(scope="module")
def cfg(detection_cfg):  # noqa: F811
    MetadataCatalog.get(CLS_SET).set(task="classification", class_names=NAMES)
    c = detection_cfg.clone()
    c.MODEL.TASKS = ["classification"]
    c.DATASETS.TRAIN = c.DATASETS.TEST = (CLS_SET,)
    c.MODEL.CLASSIFICATION.LOSS_WEIGHT = 1.5
    c.MODEL.CLASSIFICATION.LABEL_SMOOTHING = 0.1
    return c


def images(n, seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
             "label": i % len(NAMES), "task": "classification"} for i in range(n)]


def _capture(model):
    seen = {}
    task = model.tasks["classification"]
    model.target_bank.register_forward_hook(lambda m, i, o: seen.__setitem__("classes", o))
    decode = model.decode_image

    def decode_image(out):
        dec = decode(out)
        seen["spe"] = dec.spe
        return dec

    model.decode_image = decode_image
    return seen, task


def test_loss_equals_a_float64_label_smoothed_cross_entropy(cfg):
    """loss_cls = w x [(1 - eps) x NLL(true class) + eps x mean over classes of -log p],
    p = softmax(s * cos(<SPE> output, class embedding)); float64 from captured values."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    seen, task = _capture(model)
    batch = images(4)
    losses = model(batch)
    assert set(losses) == {"loss_cls"}
    s = task.logit_scale().item()
    f = seen["spe"].detach().double()
    e = seen["classes"].detach().double()
    logits = s * (f / f.norm(dim=-1, keepdim=True)) @ (e / e.norm(dim=-1, keepdim=True)).T
    logp = logits - torch.logsumexp(logits, -1, keepdim=True)
    labels = torch.tensor([x["label"] for x in batch])
    nll = -logp[torch.arange(4), labels]
    want = 1.5 * ((1 - 0.1) * nll + 0.1 * (-logp.mean(-1))).mean()
    assert losses["loss_cls"].item() == pytest.approx(want.item(), rel=1e-5)
    # the loss reaches the image encoder, the text encoder (the names), g and the temperature
    losses["loss_cls"].backward()
    for name in ("image_encoder.backbone.stem.conv1.weight", "image_encoder.global_tokens.queries",
                 "text_encoder.roberta.embeddings.word_embeddings.weight", "unified_decoder.spe",
                 "tasks.classification.logit_scale.log_scale"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_inference_logits_and_the_class_names_of_the_evaluated_dataset(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(images(3))
    assert [o["class_logits"].shape for o in out] == [(len(NAMES),)] * 3
    other = "unip_test_classification_other"
    MetadataCatalog.get(other).set(task="classification", class_names=["a", "b", "c", "d"])
    model.prepare_for_dataset(other)
    with torch.no_grad():
        out = model(images(2))
    assert out[0]["class_logits"].shape == (4,)
    assert model.target_bank.num_encodings == 2           # each name list encoded once


def test_a_tiny_model_overfits_one_batch(cfg):
    """The loss falls by a set factor on a batch it sees again and again, and the batch ends
    up classified right: a broken loss cannot pass."""
    torch.manual_seed(0)
    c = cfg.clone()
    c.MODEL.CLASSIFICATION.LABEL_SMOOTHING = 0.0
    model = build_model(c).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = images(6, seed=3)
    first = None
    for step in range(40):
        torch.manual_seed(step)
        loss = model(batch)["loss_cls"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first, (first, loss.item())
    model.eval()
    with torch.no_grad():
        pred = [int(o["class_logits"].argmax()) for o in model(batch)]
    assert pred == [x["label"] for x in batch]


def test_evaluator_top1_top5_on_a_hand_worked_case():
    ev = ClassificationEvaluator("unip_test_cls_eval", distributed=False)
    ev.reset()
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6],    # label 6: rank 0 -> top1, top5
                           [6.0, 5, 4, 3, 2, 1, 0],    # label 4: rank 4 -> top5 only
                           [6.0, 5, 4, 3, 2, 1, 0],    # label 5: rank 5 -> neither
                           [1.0, 1, 0, 0, 0, 0, 0]])   # label 1: tie with 0 -> top1
    ev.process([{"label": 6}, {"label": 4}, {"label": 5}, {"label": 1}],
               [{"class_logits": row} for row in logits])
    assert ev.evaluate() == {"classification": {"top1": 50.0, "top5": 75.0}}
    with pytest.raises(ValueError, match="label 7 outside the 7 classes"):
        ev.process([{"label": 7}], [{"class_logits": logits[0]}])


def _png(path, h, w, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def test_mapper_crops_flips_and_centre_crops(tmp_path):
    path = str(tmp_path / "a.png")
    # columns carry their index: after a centre crop of the 40-wide image resized to
    # 20 x 40 -> 10 x 20, the kept columns are the middle half
    ramp = np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (20, 1, 3))
    Image.fromarray(ramp).save(path)
    test = ClassificationDatasetMapper(False, image_size=10, test_crop_ratio=1.0)
    out = test({"file_name": path, "image_id": 1, "label": 2})
    assert out["image"].shape == (3, 10, 10) and out["image"].dtype == torch.uint8
    assert out["label"] == 2 and out["height"] == out["width"] == 10
    # resized column j of 20 covers source columns 2j, 2j+1 (values 12j, 12j + 6); kept j=5..14
    want = torch.tensor([12 * j + 3 for j in range(5, 15)], dtype=torch.float32)
    assert torch.allclose(out["image"][0, 4].float(), want, atol=1.0)
    train = ClassificationDatasetMapper(True, image_size=12, crop_scale=(0.5, 1.0))
    torch.manual_seed(0)
    a = train({"file_name": path, "image_id": 1, "label": 2})
    torch.manual_seed(0)
    b = train({"file_name": path, "image_id": 1, "label": 2})
    assert a["image"].shape == (3, 12, 12) and torch.equal(a["image"], b["image"])


def test_mapper_bad_input(tmp_path, caplog):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    mapper = ClassificationDatasetMapper(True, image_size=8)
    with caplog.at_level(logging.WARNING):
        assert mapper({"file_name": str(bad), "image_id": 5, "label": 0}) is None
    assert mapper.num_skipped == 1 and "Skipping image" in caplog.text
    good = str(tmp_path / "good.png")
    _png(good, 16, 16)
    for label in (None, "2", 1.0, True):
        with pytest.raises(ValueError, match="'label' must be an int"):
            mapper({"file_name": good, "image_id": 6, "label": label})
    with pytest.raises(ValueError, match="crop_scale"):
        ClassificationDatasetMapper(True, image_size=8, crop_scale=(0.0, 1.0))
