"""TargetBank: cache hits in eval mode, invalidation on train()/eval() and on loading."""
import pytest
import torch
from torch import nn

import unip_v2  # noqa: F401

from unip_v2.modeling.target_bank import TargetBank


class Owner(nn.Module):
    """A stand-in model: embeds a name by a learned table of its letters."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(128, 4)
        self.bank = TargetBank(self.encode)

    def encode(self, names):
        return torch.stack([self.table(torch.tensor([ord(c) for c in n])).mean(0) for n in names])


def test_eval_mode_caches_and_train_mode_does_not():
    m = Owner().eval()
    a = m.bank(["red circle", "blue square"])
    b = m.bank(["red circle", "blue square"])
    assert a is b and m.bank.num_encodings == 1 and not a.requires_grad
    m.bank(["green star"])  # another target set: encoded once, cached separately
    assert m.bank.num_encodings == 2
    m.train()
    c = m.bank(["red circle", "blue square"])
    d = m.bank(["red circle", "blue square"])
    assert m.bank.num_encodings == 4 and c.requires_grad and c is not d


def test_cache_dropped_on_mode_switch_and_on_load():
    m = Owner().eval()
    before = m.bank(["red circle"])
    m.train()
    with torch.no_grad():
        m.table.weight.add_(1.0)  # a training step changed the weights
    m.eval()
    after = m.bank(["red circle"])
    assert not torch.allclose(before, after)

    other = Owner()
    m.load_state_dict(other.state_dict())  # loading weights must invalidate the cache too
    loaded = m.bank(["red circle"])
    assert torch.allclose(loaded, other.eval().bank(["red circle"]))
    assert not torch.allclose(loaded, after)


def test_bad_targets_and_bad_encoder_output():
    m = Owner().eval()
    with pytest.raises(ValueError, match="empty"):
        m.bank([])
    with pytest.raises(ValueError, match="non-empty strings"):
        m.bank(["ok", ""])
    bad = TargetBank(lambda names: torch.zeros(len(names) + 1, 3)).eval()
    with pytest.raises(ValueError, match=r"\(2, D\).*\(3, 3\)"):
        bad(["a", "b"])
