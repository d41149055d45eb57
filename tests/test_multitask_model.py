"""One generalist, every pillar task (Uni-Perceiver v2, Sec. 4.3 and Table 1): a model built
with all registered tasks trains one batch of each in turn with one optimiser, and each batch
moves the shared encoders and g, trains its own task's parameters and leaves the other tasks'
parameters without gradient."""
import math

import pytest
import torch

import unip_v2  # noqa: F401  first: makes detectron2 importable

from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from unip_v2.modeling.tasks import TASK_REGISTRY
from unip_v2.modeling.text_encoder import train_byte_level_bpe

from test_uni_perceiver_v2 import NAMES, batch as detection_batch, cfg as detection_cfg  # noqa: F401

ALL_TASKS = ["detection", "classification", "retrieval", "captioning", "mlm"]
CLS_SET = "unip_test_multitask_model_classes"
CAPTIONS = ["a red circle and a blue triangle", "a green square on a striped background",
            "a blue triangle", "a red circle, a green square and a blue triangle"]


@pytest.fixture(scope="module")
def cfg(detection_cfg, tmp_path_factory):  # noqa: F811
    tok = str(tmp_path_factory.mktemp("multitask_tok"))
    train_byte_level_bpe(NAMES * 4 + CAPTIONS * 4, tok, vocab_size=300, min_frequency=1)
    MetadataCatalog.get(CLS_SET).set(task="classification", class_names=NAMES)
    c = detection_cfg.clone()
    c.MODEL.TASKS = ALL_TASKS
    c.MODEL.TEXT_ENCODER.TOKENIZER = tok
    c.DATASETS.TRAIN = c.DATASETS.TRAIN + (CLS_SET,)
    c.MODEL.CAPTIONING.MAX_LENGTH = 6
    c.MODEL.TEXT_ENCODER.CONTEXT_LENGTH = 24   # the longest caption above fits
    return c


def _images(n, seed, size=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
            for _ in range(n)]


def batches():
    """One batch per task, in the format of its dataset mapper."""
    image_text = [{"image": im, "caption": c, "captions": [c], "image_id": i}
                  for i, (im, c) in enumerate(zip(_images(3, 1), CAPTIONS))]
    return {
        "detection": [dict(x, task="detection") for x in detection_batch()],
        "classification": [{"image": im, "label": i % len(NAMES), "task": "classification"}
                           for i, im in enumerate(_images(3, 0))],
        "retrieval": [dict(x, task="retrieval") for x in image_text],
        "captioning": [dict(x, task="captioning") for x in image_text],
        "mlm": [{"text": c, "task": "mlm"} for c in CAPTIONS],
    }


def _grads(params):
    return {n: (None if p.grad is None else float(p.grad.abs().sum())) for n, p in params}


def test_every_task_is_registered():
    assert set(ALL_TASKS) <= set(TASK_REGISTRY)


def test_a_model_with_every_task_trains_one_batch_of_each(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert list(model.tasks.keys()) == ALL_TASKS
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    shared = [(n, p) for n, p in model.named_parameters()
              if n.startswith(("unified_decoder.layers.0.attn", "text_encoder.roberta"))]
    for name, inputs in batches().items():
        opt.zero_grad(set_to_none=True)
        before = {n: p.detach().clone() for n, p in shared}
        losses = model(inputs)
        assert losses and all(math.isfinite(v.item()) and v.item() > 0 for v in losses.values()), \
            (name, losses)
        sum(losses.values()).backward()
        # the task's own parameters learn from its batch, the other tasks' do not
        for task, module in model.tasks.items():
            grads = _grads(module.named_parameters())
            if task == name:
                assert grads and all(g is not None and g > 0 for g in grads.values()), \
                    (name, grads)
            else:
                assert all(g is None for g in grads.values()), (name, task, grads)
        # every task goes through g and (for its targets or its input) f_text
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for _, p in shared), name
        opt.step()
        assert all(not torch.equal(before[n], p) for n, p in shared), name

    model.eval()
    with torch.no_grad():
        out = {name: model(inputs) for name, inputs in batches().items()}
    assert "instances" in out["detection"][0]
    assert out["classification"][0]["class_logits"].shape == (len(NAMES),)
    assert out["retrieval"][0]["image_embedding"].shape == (cfg.MODEL.UNIFIED_DECODER.WIDTH,)
    assert all(isinstance(o["caption"], str) for o in out["captioning"])
    assert len(out["mlm"]) == len(CAPTIONS)


def test_one_checkpoint_holds_every_task(cfg, tmp_path):
    """The state dict of the five-task model loads strictly into a fresh one: one set of
    weights for every task."""
    torch.manual_seed(0)
    a = build_model(cfg)
    torch.manual_seed(1)
    b = build_model(cfg)
    b.load_state_dict(a.state_dict(), strict=True)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    assert {n.split(".")[1] for n in a.state_dict() if n.startswith("tasks.")} == set(ALL_TASKS)


def test_eval_only_evaluates_every_dataset_with_its_task_in_one_run(cfg, tmp_path, caplog):
    """Trainer.test over a classification, a retrieval and an MLM dataset (tiny ones written
    here) returns every task's metrics and logs them in one table (what --eval-only does)."""
    import logging

    from PIL import Image

    from unip_v2.data.datasets.task_common import register_task_dataset
    from unip_v2.engine import Trainer

    files = []
    for i, im in enumerate(_images(4, 3, size=96)):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(files[-1])
    sets = {
        "unip_test_multitask_eval_cls": ("classification", lambda: [
            {"file_name": f, "image_id": i, "label": i % len(NAMES)} for i, f in enumerate(files)],
            {"class_names": NAMES}),
        "unip_test_multitask_eval_ret": ("retrieval", lambda: [
            {"file_name": f, "image_id": i, "captions": [c]}
            for i, (f, c) in enumerate(zip(files, CAPTIONS))], {}),
        "unip_test_multitask_eval_mlm": ("mlm", lambda: [{"text": c} for c in CAPTIONS], {}),
    }
    for name, (task, load, meta) in sets.items():
        register_task_dataset(name, load, task=task, **meta)
    c = cfg.clone()
    c.DATASETS.TEST = tuple(sets)
    c.DATALOADER.NUM_WORKERS = 0
    c.MODEL.CLASSIFICATION.IMAGE_SIZE = c.MODEL.RETRIEVAL.IMAGE_SIZE = 96
    c.OUTPUT_DIR = str(tmp_path / "out")
    torch.manual_seed(0)
    model = build_model(c).eval()
    with caplog.at_level(logging.INFO, logger="unip_v2"):
        results = Trainer.test(c, model)
    assert list(results) == list(sets)
    assert set(results["unip_test_multitask_eval_cls"]) == {"classification"}
    assert set(results["unip_test_multitask_eval_ret"]) == {"retrieval"}
    assert set(results["unip_test_multitask_eval_mlm"]) == {"mlm"}
    # 4 images, top-5 over 3 classes: every label is in the top 5
    assert results["unip_test_multitask_eval_cls"]["classification"]["top5"] == 100.0
    table = next(r.getMessage() for r in caplog.records if "Results of every dataset" in
                 r.getMessage())
    assert all(name in table for name in sets)
