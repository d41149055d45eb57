"""Detection in the unified formulation: logits, matched class loss, top-k scoring."""
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
    f = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    e = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    out = class_logits(f, e, torch.tensor(10.0))
    expected = 10 * torch.tensor([[[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]]])
    assert torch.allclose(out, expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(1, 2, 2\).*\(2, 3\)"):
        class_logits(f, torch.zeros(2, 3), torch.tensor(1.0))


def test_matched_class_loss_uses_only_matched_top_o_proposals():
    logits = torch.zeros(2, 3, 4, requires_grad=True)
    index = torch.tensor([[7, 2, 5], [0, 1, 9]])
    # image 0: query 2 <-> gt 1 (class 3), query 4 <-> gt 0 (not in the top O: no loss);
    # image 1: no objects
    matches = [(torch.tensor([2, 4]), torch.tensor([1, 0])), (torch.tensor([], dtype=torch.long),) * 2]
    gt = [torch.tensor([0, 3]), torch.tensor([], dtype=torch.long)]
    loss = matched_class_loss(logits, index, matches, gt)
    assert math.isclose(loss.item(), math.log(4), rel_tol=1e-6)
    loss.backward()
    grad = logits.grad
    assert grad[0, 1].abs().sum() > 0 and grad[0, 1, 3] < 0           # pushes class 3 up
    assert grad[0, [0, 2]].abs().sum() == 0 and grad[1].abs().sum() == 0
    none = matched_class_loss(logits, index, [(torch.tensor([4]), torch.tensor([0]))] * 2, gt)
    assert none.item() == 0.0 and none.requires_grad


def test_detection_topk_scores_pairs():
    obj = torch.tensor([10.0, -10.0])
    cls = torch.tensor([[0.0, 5.0], [5.0, 0.0]])
    scores, prop, label = detection_topk(obj, cls, k=3)
    assert prop.tolist()[0] == 0 and label.tolist()[0] == 1
    assert (scores[:-1] >= scores[1:]).all() and len(scores) == 3
    assert torch.isclose(scores[0], torch.sigmoid(torch.tensor(10.0)) * torch.softmax(cls[0], 0)[1])
