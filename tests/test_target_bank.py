"""TargetBank: cache hits in eval mode, invalidation on train()/eval() and on loading."""
import os

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


# ------------------------------------------------------------------ the vocabulary
V, D = 7, 3


class VocabOwner(nn.Module):
    """Embeds token id v as row v of a table: an encoder whose output is known exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(V, D)
        self.bank = TargetBank(lambda names: None, self.encode_tokens, V)

    def encode_tokens(self, ids):
        return self.table(ids)


def test_vocabulary_rows_are_the_token_encodings_cached_in_eval_only():
    m = VocabOwner()
    vocab = m.bank.vocabulary()
    assert torch.equal(vocab, m.table.weight) and vocab.requires_grad   # row v = encoding of v
    assert m.bank.vocabulary() is not vocab and m.bank.num_encodings == 2  # training: afresh
    m.eval()
    a, b = m.bank.vocabulary(), m.bank.vocabulary()
    assert a is b and m.bank.num_encodings == 3 and not a.requires_grad
    m.bank.clear()
    assert m.bank.vocabulary() is not a
    with pytest.raises(ValueError, match="no vocabulary"):
        Owner().bank.vocabulary()


def _vocabulary_on_two_processes(rank, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        m = VocabOwner()                       # the same weights on both processes (seed 0)
        vocab = m.bank.vocabulary()
        weights = torch.arange(V * D, dtype=torch.float32).view(V, D) * (rank + 1)
        (vocab * weights).sum().backward()
        # a file, not a multiprocessing queue: a queue hands tensors over as shared-memory
        # file descriptors, which vanish when this process exits before the parent reads
        # them (a FileNotFoundError seen on CI)
        torch.save((rank, vocab.detach(), m.table.weight.grad, m.bank.num_encodings),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_vocabulary_is_sliced_over_processes_and_gathered_with_autograd(tmp_path):
    """World 2, V = 7: each process encodes ceil(7 / 2) = 4 ids (process 1: ids 4, 5, 6 and a
    copy of 6, trimmed), all-gathered. Process r's loss is sum(vocab * W (r + 1)); autograd's
    all_gather sends every process's gradient of a slice to the process that encoded it, so
    process r's table gradient is W (1 + 2) = 3 W on its own rows and 0 elsewhere (the
    all-reduce of DDP then gives every row 3 W, the one-process gradient of both losses)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: a spawned process would import the test module's dependencies again; a worker
    # that raises makes start_processes raise here
    mp.start_processes(_vocabulary_on_two_processes, args=(port, str(tmp_path)), nprocs=2,
                       start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    table = VocabOwner().table.weight.detach()
    W = torch.arange(V * D, dtype=torch.float32).view(V, D)
    own = {0: slice(0, 4), 1: slice(4, 7)}
    for rank, vocab, grad, encodings in results:
        assert torch.equal(vocab, table) and encodings == 1
        expected = torch.zeros(V, D)
        expected[own[rank]] = 3 * W[own[rank]]
        assert torch.allclose(grad, expected), (rank, grad)
