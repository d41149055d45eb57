"""Detection in the unified formulation (Uni-Perceiver v2, Sec. 4.3 "Tasks with
Localization", Eq. 5 and 7): logits, matched class loss, top-k scoring.

Every value is checked against a float64 formula written out here, on seeded inputs whose
shapes differ on every axis (O proposals != C classes != D channels), so that an axis
mix-up (softmax over proposals, a flattened index divided by the wrong size, a normalisation
over the wrong dimension) changes the numbers.
"""
import math

import pytest
import torch

import unip_v2  # noqa: F401

from unip_v2.modeling.tasks import LogitScale, class_logits, detection_topk, matched_class_loss


def test_logit_scale_init_and_clamp():
    s = LogitScale()
    assert math.isclose(s().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        s.log_scale.fill_(10.0)
    assert s().item() == 100.0


def test_class_logits_are_scaled_cosines():
    """Hand-computed: cos((1, 0), (3, 0)) = 1, cos((1, 0), (1, 1)) = 1/sqrt(2),
    cos((0, 2), (3, 0)) = 0, cos((0, 2), (1, 1)) = 1/sqrt(2); times the scale 10."""
    f = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    e = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    out = class_logits(f, e, torch.tensor(10.0))
    expected = 10 * torch.tensor([[[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]]])
    assert torch.allclose(out, expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(1, 2, 2\).*\(2, 3\)"):
        class_logits(f, torch.zeros(2, 3), torch.tensor(1.0))


def test_class_logits_equal_a_float64_cosine_formula():
    """Eq. 5: logit[b, o, c] = s * <f, e> / (|f| |e|), written as a triple loop in float64.
    Features and class embeddings have very different norms (0.1 .. 40), so normalising over
    the wrong axis (or not at all) changes the values."""
    g = torch.Generator().manual_seed(0)
    B, O, C, D = 2, 5, 3, 7
    f = torch.randn(B, O, D, generator=g) * torch.tensor([0.1, 1.0, 3.0, 20.0, 0.5])[:, None]
    e = torch.randn(C, D, generator=g) * torch.tensor([0.5, 7.0, 40.0])[:, None]
    scale = torch.tensor(12.5)
    got = class_logits(f, e, scale)
    want = torch.empty(B, O, C, dtype=torch.float64)
    for b in range(B):
        for o in range(O):
            for c in range(C):
                fv, ev = f[b, o].double(), e[c].double()
                want[b, o, c] = 12.5 * (fv @ ev) / (fv.norm() * ev.norm())
    assert got.shape == (B, O, C)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # the logits are bounded by the scale (cosines), and not all near it
    assert want.abs().max() <= 12.5 + 1e-9 and want.abs().min() < 12.5 / 2


def test_matched_class_loss_uses_only_matched_top_o_proposals():
    logits = torch.zeros(2, 3, 4, requires_grad=True)
    index = torch.tensor([[7, 2, 5], [0, 1, 9]])
    # image 0: query 2 <-> gt 1 (class 3), query 4 <-> gt 0 (not in the top O: no loss);
    # image 1: no objects. Uniform logits over 4 classes: CE = log 4.
    matches = [(torch.tensor([2, 4]), torch.tensor([1, 0])), (torch.tensor([], dtype=torch.long),) * 2]
    gt = [torch.tensor([0, 3]), torch.tensor([], dtype=torch.long)]
    loss = matched_class_loss(logits, index, matches, gt)
    assert math.isclose(loss.item(), math.log(4), rel_tol=1e-6)
    loss.backward()
    grad = logits.grad
    # d CE / d logit = softmax - onehot = 1/4 - [c == 3]: (1/4, 1/4, 1/4, -3/4) on row (0, 1)
    torch.testing.assert_close(grad[0, 1], torch.tensor([0.25, 0.25, 0.25, -0.75]))
    assert grad[0, [0, 2]].abs().sum() == 0 and grad[1].abs().sum() == 0
    none = matched_class_loss(logits, index, [(torch.tensor([4]), torch.tensor([0]))] * 2, gt)
    assert none.item() == 0.0 and none.requires_grad


def test_matched_class_loss_equals_float64_cross_entropy_over_matched_top_o():
    """Eq. 7 on the proposals matched to ground truth: the oracle walks the matches, finds
    each matched query's position among the top-O proposals (skipping the one that did not
    make it), takes the class of the matched ground truth (gt indices are permuted, so the
    gt index is not the query index), and averages -log softmax in float64."""
    g = torch.Generator().manual_seed(1)
    B, O, C = 2, 4, 3
    logits = (torch.randn(B, O, C, generator=g) * 2).requires_grad_()
    index = torch.tensor([[6, 1, 4, 0], [2, 5, 3, 7]])            # top-O of Q = 8 queries
    matches = [(torch.tensor([4, 3, 0]), torch.tensor([2, 0, 1])),  # query 3 is not in the top O
               (torch.tensor([7, 2]), torch.tensor([1, 0]))]
    gt = [torch.tensor([1, 2, 0]), torch.tensor([2, 1])]
    # (image, position among the top O, class): query 4 -> pos 2, gt 2 -> class 0;
    # query 0 -> pos 3, gt 1 -> class 2; query 7 -> pos 3, gt 1 -> class 1;
    # query 2 -> pos 0, gt 0 -> class 2
    terms = [(0, 2, 0), (0, 3, 2), (1, 3, 1), (1, 0, 2)]
    x = logits.detach().double()
    want = sum(-(x[b, o, c] - torch.logsumexp(x[b, o], 0)) for b, o, c in terms) / len(terms)
    loss = matched_class_loss(logits, index, matches, gt)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    loss.backward()
    # gradient rows: (softmax - onehot) / 4 at the matched positions, exactly 0 elsewhere
    want_grad = torch.zeros(B, O, C, dtype=torch.float64)
    for b, o, c in terms:
        want_grad[b, o] += (x[b, o].softmax(0) - torch.eye(C, dtype=torch.float64)[c]) / len(terms)
    torch.testing.assert_close(logits.grad.double(), want_grad, rtol=1e-5, atol=1e-7)
    assert (logits.grad[0, :2] == 0).all() and (logits.grad[1, 1:3] == 0).all()


def _topk_oracle(obj, cls, k):
    """float64: score[o, c] = sigmoid(obj[o]) * softmax_c(cls[o])[c]; all O * C pairs sorted
    by score, highest first, the first k kept."""
    obj, cls = obj.double(), cls.double()
    O, C = cls.shape
    pairs = []
    for o in range(O):
        p_obj = 1 / (1 + math.exp(-obj[o].item()))
        z = sum(math.exp(v) for v in cls[o].tolist())
        for c in range(C):
            pairs.append((p_obj * math.exp(cls[o, c].item()) / z, o, c))
    pairs.sort(key=lambda t: -t[0])
    return pairs[:k], pairs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detection_topk_equals_a_float64_oracle(seed):
    """O = 5 proposals, C = 3 classes, an asymmetric logit matrix: the scores, proposal
    indices and labels of the top 7 pairs equal the oracle's (objectness sigmoid x class
    softmax over the C classes of one proposal)."""
    g = torch.Generator().manual_seed(seed)
    O, C, k = 5, 3, 7
    obj = torch.randn(O, generator=g) * 2
    cls = torch.randn(O, C, generator=g) * 3
    top, pairs = _topk_oracle(obj, cls, k)
    assert top[-1][0] - pairs[k][0] > 1e-4        # no near-tie at the cut
    scores, prop, label = detection_topk(obj, cls, k)
    assert prop.tolist() == [o for _, o, _ in top]
    assert label.tolist() == [c for _, _, c in top]
    torch.testing.assert_close(scores.double(), torch.tensor([s for s, _, _ in top],
                                                             dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)


def test_detection_topk_k_larger_than_all_pairs_returns_every_pair():
    g = torch.Generator().manual_seed(3)
    obj, cls = torch.randn(4, generator=g), torch.randn(4, 2, generator=g)
    _, pairs = _topk_oracle(obj, cls, 8)
    scores, prop, label = detection_topk(obj, cls, k=100)
    assert len(scores) == 8
    assert list(zip(prop.tolist(), label.tolist())) == [(o, c) for _, o, c in pairs]
    # every pair once; the scores of one proposal sum to its objectness probability
    for o in range(4):
        total = scores[prop == o].double().sum()
        assert total.item() == pytest.approx(torch.sigmoid(obj[o].double()).item(), rel=1e-5)


def test_detection_topk_hand_computed():
    """obj = (ln 3, 0): sigmoid = (3/4, 1/2); class logits row 0 = (0, ln 3): softmax
    (1/4, 3/4); row 1 = (ln 4, 0): softmax (4/5, 1/5). Scores: (0,0) 3/16, (0,1) 9/16,
    (1,0) 2/5, (1,1) 1/10; top 3: (0,1) 9/16, (1,0) 2/5, (0,0) 3/16."""
    obj = torch.tensor([math.log(3), 0.0])
    cls = torch.tensor([[0.0, math.log(3)], [math.log(4), 0.0]])
    scores, prop, label = detection_topk(obj, cls, k=3)
    assert prop.tolist() == [0, 1, 0] and label.tolist() == [1, 0, 0]
    torch.testing.assert_close(scores, torch.tensor([9 / 16, 2 / 5, 3 / 16]))
