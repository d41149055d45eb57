"""Image-text retrieval (Uni-Perceiver v2, Sec. 4.3): the image's <SPE> output against the
caption's [<SPE>, f_text(caption)] output (a target), symmetric InfoNCE with label smoothing,
features gathered over processes; Recall@K of both directions."""
import math
import os
import socket

import pytest
import torch

import unip_v2  # noqa: F401  first: makes detectron2 importable

from detectron2.modeling import build_model

from unip_v2.data.dataset_mappers import ImageTextDatasetMapper
from unip_v2.evaluation import RetrievalEvaluator, retrieval_ranks
from unip_v2.modeling.tasks import TASK_REGISTRY, contrastive_losses
from unip_v2.modeling.unified_decoder.attributes import AttributeBit, SegmentKind

from test_uni_perceiver_v2 import cfg as detection_cfg  # noqa: F401  (tiny generalist)

# words of the tiny tokenizer's corpus (test_uni_perceiver_v2's cfg fixture)
CAPTIONS = ["a red circle", "a green square", "a blue triangle",
            "a red circle and a blue triangle", "a green square and a red circle",
            "a blue triangle and a green square"]


@pytest.fixture(scope="module")
def cfg(detection_cfg):  # noqa: F811
    c = detection_cfg.clone()
    c.MODEL.TASKS = ["retrieval"]
    c.MODEL.RETRIEVAL.LOSS_WEIGHT = 1.5
    c.MODEL.RETRIEVAL.LABEL_SMOOTHING = 0.1
    c.MODEL.RETRIEVAL.IMAGE_SIZE = 64
    return c


def pairs(n, seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
             "caption": CAPTIONS[i % len(CAPTIONS)], "captions": [CAPTIONS[i % len(CAPTIONS)]],
             "image_id": 100 + i, "task": "retrieval"} for i in range(n)]


# ---------------------------------------------------------------- oracles (float64)
def oracle_info_nce(img, txt, scale, eps):
    """(loss_i2t, loss_t2i) of the symmetric InfoNCE, written out in float64: p = softmax of
    s * cos over the N candidates, loss = mean over queries of (1 - eps) * -log p[positive]
    + eps * mean over candidates of -log p."""
    img = img.double() / img.double().norm(dim=-1, keepdim=True)
    txt = txt.double() / txt.double().norm(dim=-1, keepdim=True)
    out = []
    for logits in (scale * img @ txt.T, scale * txt @ img.T):
        logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        nll = -logp.diagonal()
        out.append(((1 - eps) * nll + eps * (-logp.mean(dim=1))).mean())
    return out


def brute_force_recalls(img, caps, owner, ks=(1, 5, 10)):
    """Recall@K by sorting every query's candidates (Python loops): an image is found at K
    when any of its captions is among the K most similar captions; a caption when its image
    is among the K most similar images."""
    img = img.double() / img.double().norm(dim=-1, keepdim=True)
    caps = caps.double() / caps.double().norm(dim=-1, keepdim=True)
    sim = (img @ caps.T).tolist()
    n, m = len(sim), len(sim[0])
    out = {}
    for k in ks:
        found = 0
        for i in range(n):
            order = sorted(range(m), key=lambda c: -sim[i][c])[:k]
            found += any(owner[c] == i for c in order)
        out[f"i2t_R{k}"] = 100.0 * found / n
        found = 0
        for c in range(m):
            order = sorted(range(n), key=lambda i: -sim[i][c])[:k]
            found += owner[c] in order
        out[f"t2i_R{k}"] = 100.0 * found / m
    return out


# ---------------------------------------------------------------- the metric
def test_recalls_equal_a_brute_force_ranking_with_several_captions_per_image():
    torch.manual_seed(0)
    counts = [1, 3, 2, 1, 4, 2, 2, 3, 1, 2, 1, 2, 3]          # 13 images, 27 captions
    n, m = len(counts), sum(counts)
    owner = [i for i, c in enumerate(counts) for _ in range(c)]
    img = torch.randn(n, 6)
    # captions near their image, so some are found and some not (continuous: no ties)
    caps = img[owner] + 1.2 * torch.randn(m, 6)
    ev = RetrievalEvaluator("unip_test_retrieval_eval", distributed=False)
    ev.reset()
    start = 0
    for i, c in enumerate(counts):          # two images per process() call
        ev.process([{}], [{"image_embedding": img[i], "caption_embeddings": caps[start:start + c],
                           "image_id": i}])
        start += c
    got = ev.evaluate()["retrieval"]
    want = brute_force_recalls(img, caps, owner)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert 0 < want["i2t_R1"] < 100 and 0 < want["t2i_R1"] < 100   # a case that discriminates
    assert got["mean_R1"] == pytest.approx((want["i2t_R1"] + want["t2i_R1"]) / 2)
    assert got["mean_recall"] == pytest.approx(sum(want.values()) / 6)
    # blocks of 4 images give the ranks of one block
    a = retrieval_ranks(img, caps, torch.tensor(owner))
    b = retrieval_ranks(img, caps, torch.tensor(owner), chunk=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_recalls_on_a_hand_worked_case_with_ties_counted_against_the_query():
    # 2-D embeddings at angles (degrees): images at 0 and 90; image 0's captions at 10 and
    # 105, image 1's at 80. Image 0: its caption 10 (10 off) beats 80 (80 off) -> rank 0.
    # Image 1: its 80 (10 off) beats 105 (15 off) -> rank 0. Caption 105: image 1 is 15 off,
    # its image 0 is 105 off -> rank 1; captions 10 and 80 find their image first.
    deg = lambda a: torch.tensor([math.cos(math.radians(a)), math.sin(math.radians(a))])
    img = torch.stack([deg(0), deg(90)])
    caps = torch.stack([deg(10), deg(105), deg(80)])
    i2t, t2i = retrieval_ranks(img, caps, torch.tensor([0, 0, 1]))
    assert i2t.tolist() == [0, 0] and t2i.tolist() == [0, 1, 0]
    # everything on one point: every positive ties with every negative and ranks last
    i2t, t2i = retrieval_ranks(torch.ones(3, 4), torch.ones(5, 4), torch.tensor([0, 0, 1, 2, 2]))
    assert i2t.tolist() == [3, 4, 3] and t2i.tolist() == [2, 2, 2, 2, 2]


def test_evaluator_bad_input():
    ev = RetrievalEvaluator("unip_test_retrieval_bad", distributed=False)
    with pytest.raises(ValueError, match="caption embeddings"):
        ev.process([{}], [{"image_embedding": torch.ones(4), "caption_embeddings": torch.ones(0, 4),
                           "image_id": 1}])
    ev.reset()
    for _ in range(2):
        ev.process([{}], [{"image_embedding": torch.ones(4),
                           "caption_embeddings": torch.ones(1, 4), "image_id": 7}])
    with pytest.raises(ValueError, match=r"image_id\(s\) \[7\] evaluated more than once"):
        ev.evaluate()


# ---------------------------------------------------------------- the loss
def test_contrastive_losses_equal_a_float64_oracle():
    torch.manual_seed(1)
    img, txt = torch.randn(5, 7), torch.randn(5, 7)
    scale = torch.tensor(3.7)
    for eps in (0.0, 0.1):
        got = contrastive_losses(img, txt, scale, eps)
        want = oracle_info_nce(img, txt, 3.7, eps)
        for g, w in zip(got, want):
            assert g.item() == pytest.approx(w.item(), rel=1e-5)
    # float32 under autocast too (bf16 on the CPU: its 8-bit mantissa would move the loss
    # in the third digit)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = contrastive_losses(img, txt, scale, 0.1)
    want = oracle_info_nce(img, txt, 3.7, 0.1)
    assert [g.dtype for g in got] == [torch.float32] * 2
    for g, w in zip(got, want):
        assert g.item() == pytest.approx(w.item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"must both be \(B, D\)"):
        contrastive_losses(img, txt[:4], scale)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank, world, port, out_dir, img, txt, scale, eps):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        b = img.shape[0] // world
        result = {}
        for gather in (True, False):
            mine_img = img[rank * b:(rank + 1) * b].clone().requires_grad_(True)
            mine_txt = txt[rank * b:(rank + 1) * b].clone().requires_grad_(True)
            s = scale.clone().requires_grad_(True)
            i2t, t2i = contrastive_losses(mine_img, mine_txt, s, eps, gather=gather)
            (i2t + t2i).backward()
            result[gather] = {"i2t": i2t.item(), "t2i": t2i.item(), "g_img": mine_img.grad,
                              "g_txt": mine_txt.grad, "g_scale": s.grad}
        if rank == 1:      # unequal batch sizes: a clear error on every process
            short_img, short_txt = img[:1], txt[:1]
        else:
            short_img, short_txt = img[:2], txt[:2]
        try:
            contrastive_losses(short_img, short_txt, scale, eps)
            result["error"] = None
        except ValueError as e:
            result["error"] = str(e)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gathered_features_over_two_processes_equal_the_global_batch_oracle(tmp_path):
    """2 gloo processes x 3 pairs: the mean of the processes' losses is the InfoNCE of the 6
    pairs (float64 oracle over the concatenated features), and each process's gradient on
    its own features is 2 x the oracle's (DDP then averages 2 processes: the oracle's)."""
    torch.manual_seed(2)
    world, eps = 2, 0.1
    img, txt = torch.randn(6, 5), torch.randn(6, 5)
    scale = torch.tensor(2.5)
    # fork rather than spawn: a spawned process would import unip_v2 again (~10 s); the
    # workers run one thread (no OpenMP pool inherited mid-use)
    torch.multiprocessing.start_processes(
        _gather_worker, args=(world, _free_port(), str(tmp_path), img, txt, scale, eps),
        nprocs=world, start_method="fork")
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    # oracle: the global batch
    oi, ot, s = img.double().requires_grad_(), txt.double().requires_grad_(), \
        torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    i2t, t2i = oracle_info_nce(oi, ot, s, eps)
    (i2t + t2i).backward()
    got = [r[True] for r in res]
    assert sum(r["i2t"] for r in got) / world == pytest.approx(i2t.item(), rel=1e-5)
    assert sum(r["t2i"] for r in got) / world == pytest.approx(t2i.item(), rel=1e-5)
    for rank, r in enumerate(got):
        rows = slice(3 * rank, 3 * rank + 3)
        assert torch.allclose(r["g_img"].double() / world, oi.grad[rows], atol=1e-6)
        assert torch.allclose(r["g_txt"].double() / world, ot.grad[rows], atol=1e-6)
    assert sum(r["g_scale"].item() for r in got) / world == pytest.approx(s.grad.item(), rel=1e-5)
    # without gathering: each process alone, in-batch negatives only
    for rank, r in enumerate(res):
        rows = slice(3 * rank, 3 * rank + 3)
        li, lt = oracle_info_nce(img[rows], txt[rows], 2.5, eps)
        assert r[False]["i2t"] == pytest.approx(li.item(), rel=1e-5)
        assert r[False]["t2i"] == pytest.approx(lt.item(), rel=1e-5)
        assert "same batch size on every process, got [2, 1]" in r["error"]


# ---------------------------------------------------------------- the task in the model
def _capture(model):
    """Record what g receives: per call, its segment kinds, routing rows and <SPE> output."""
    calls = []
    dec = model.unified_decoder
    assemble, forward = dec._assemble, dec.forward

    def _assemble(segments, is_target):
        tokens, padding, rows, lengths = assemble(segments, is_target)
        calls.append({"kinds": [SegmentKind(s.kind) for s in segments], "rows": rows,
                      "batch": tokens.shape[0]})
        return tokens, padding, rows, lengths

    def _forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls[-1]["spe"] = out.spe
        return out

    dec._assemble, dec.forward = _assemble, _forward
    return calls


def test_loss_wiring_routing_and_gradients(cfg):
    """Training: g sees the images as inputs (TARGET bit off) and the B captions as targets
    (TARGET bit on, text only); the losses are w x the float64 InfoNCE of exactly those
    <SPE> outputs; the gradient reaches the image encoder, the text encoder, g and the
    task's temperature."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    calls = _capture(model)
    texts = []
    encode = model.text_encoder.encode
    model.text_encoder.encode = lambda t, *a, **k: texts.append(list(t)) or encode(t, *a, **k)
    batch = pairs(4)
    losses = model(batch)
    assert set(losses) == {"loss_i2t", "loss_t2i"}
    assert len(calls) == 2
    image_call, text_call = calls
    assert image_call["kinds"] == [SegmentKind.IMAGE_GLOBAL, SegmentKind.IMAGE_REGION]
    assert all(row[AttributeBit.TARGET] == 0.0 for row in image_call["rows"])
    assert text_call["kinds"] == [SegmentKind.TEXT] and text_call["batch"] == 4
    assert all(row[AttributeBit.TARGET] == 1.0 for row in text_call["rows"])
    s = model.tasks["retrieval"].logit_scale().item()
    want = oracle_info_nce(image_call["spe"].detach(), text_call["spe"].detach(), s, 0.1)
    assert losses["loss_i2t"].item() == pytest.approx(1.5 * want[0].item(), rel=1e-5)
    assert losses["loss_t2i"].item() == pytest.approx(1.5 * want[1].item(), rel=1e-5)
    # the texts encoded are the batch's captions, in its order
    assert texts == [[x["caption"] for x in batch]]
    (losses["loss_i2t"] + losses["loss_t2i"]).backward()
    params = dict(model.named_parameters())
    for name in ("image_encoder.backbone.stem.conv1.weight", "image_encoder.global_tokens.queries",
                 "text_encoder.roberta.embeddings.word_embeddings.weight", "unified_decoder.spe",
                 "unified_decoder.layers.0.attn.qkv.weight",
                 "tasks.retrieval.logit_scale.log_scale"):
        grad = params[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_a_tiny_model_overfits_one_batch(cfg):
    """The loss falls by a set factor on a batch it sees again and again, until every image
    retrieves its own caption first and every caption its image: a broken loss or pairing
    cannot pass."""
    torch.manual_seed(0)
    c = cfg.clone()
    c.MODEL.RETRIEVAL.LABEL_SMOOTHING = 0.0
    model = build_model(c).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = pairs(6, seed=3)
    first = None
    for step in range(50):
        torch.manual_seed(step)
        losses = model(batch)
        loss = losses["loss_i2t"] + losses["loss_t2i"]
        assert torch.isfinite(loss)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first, (first, loss.item())
    # a row's cross-entropy below ln 2 means p(positive) > 1/2: the positive is the argmax.
    # Each direction's mean (x w = 1.5) below ln(2) / 6 puts every one of its 6 rows there:
    # in the last step every image found its caption first and every caption its image.
    for key in ("loss_i2t", "loss_t2i"):
        assert losses[key].item() / 1.5 < math.log(2) / 6, (key, losses[key].item())


def test_inference_outputs_and_the_evaluator_on_them(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = pairs(3)
    batch[1]["captions"] = CAPTIONS[:3]
    with torch.no_grad():
        out = model(batch)
    width = cfg.MODEL.UNIFIED_DECODER.WIDTH
    assert [o["image_embedding"].shape for o in out] == [(width,)] * 3
    assert [o["caption_embeddings"].shape for o in out] == [(1, width), (3, width), (1, width)]
    assert [o["image_id"] for o in out] == [100, 101, 102]
    for o in out:
        assert torch.allclose(o["image_embedding"].norm(), torch.tensor(1.0), atol=1e-5)
        assert torch.allclose(o["caption_embeddings"].norm(dim=-1), torch.ones(1), atol=1e-5)
    # a caption encoded with the others of its batch = encoded alone
    alone = model.encode_targets([CAPTIONS[2]])[0]
    assert torch.allclose(out[1]["caption_embeddings"][2], alone / alone.norm(), atol=1e-5)
    ev = RetrievalEvaluator("unip_test_retrieval_model", distributed=False)
    ev.reset()
    ev.process(batch, out)
    result = ev.evaluate()["retrieval"]
    assert set(result) == {f"{d}_R{k}" for d in ("i2t", "t2i", "mean") for k in (1, 5, 10)} | {
        "mean_recall"}
    assert result["i2t_R5"] == result["t2i_R5"] == 100.0     # 3 images: all within the top 5


def test_a_batch_without_its_caption_is_a_clear_error(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).train()
    for bad in (None, "", " ", ["a red circle"]):
        batch = pairs(2)
        batch[1]["caption"] = bad
        if bad is None:
            del batch[1]["caption"]
        with pytest.raises(ValueError, match=r"input 1 .*image_id 101.* needs 'caption'"):
            model(batch)
    model.eval()
    for bad in (None, [], "a red circle", ["a red circle", ""]):
        batch = pairs(2)
        batch[0]["captions"] = bad
        with pytest.raises(ValueError, match=r"input 0 .* needs 'captions'"), torch.no_grad():
            model(batch)


def test_the_mapper_of_the_task(cfg):
    mapper = TASK_REGISTRY["retrieval"].build_dataset_mapper(cfg, is_train=True)
    assert isinstance(mapper, ImageTextDatasetMapper)
    assert mapper.image_size == 64 and mapper.is_train
    assert not TASK_REGISTRY["retrieval"].build_dataset_mapper(cfg, is_train=False).is_train
