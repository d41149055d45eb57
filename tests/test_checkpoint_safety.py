"""Weights that load without running code, atomic checkpoint files, and the clear errors of
tools/train_net.py for settings that used to fail late or silently."""
import argparse
import io
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import unip_v2  # noqa: F401  (first: makes detectron2 importable)

from detectron2.config import get_cfg

from tools_loader import REPO, load_tool
from toy_data import make_toy_data
from unip_v2 import add_unip_v2_config
from unip_v2.engine import Checkpointer, Trainer, check_finite_weights
from unip_v2.modeling.backbone.pretrained import read_weights_file
from unip_v2.utils.safe_pickle import UnsafePickleError, load_pickle

train_net = load_tool("train_net")
CONFIG = os.path.join(REPO, "configs", "toy", "uni_perceiver_v2_R50_tiny.yaml")


class Payload:
    """Unpickling this calls os.system: what a malicious weights file does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_model_zoo_pickles_load(tmp_path, protocol):
    """detectron2's model-zoo layout ({"model": numpy arrays, "__author__"}), with NumPy
    scalars and torch tensors, in every pickle protocol."""
    source = small_model()
    weights = {k: v.numpy().copy() for k, v in source.state_dict().items()}
    weights["1.num_batches_tracked"] = np.array(5, dtype=np.int64)
    weights["0.bias"] = weights["0.bias"].astype(np.float64)   # converted to the model dtype
    path = tmp_path / "model.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "test", "extra": torch.ones(2)}, f,
                    protocol=protocol)
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    Checkpointer(target).load(str(path))
    for k, v in source.state_dict().items():
        want = torch.tensor(5) if k == "1.num_batches_tracked" else v
        assert torch.allclose(target.state_dict()[k], want, rtol=0, atol=1e-7), k
    loaded = load_pickle(str(path))
    assert torch.equal(loaded["extra"], torch.ones(2)) and loaded["__author__"] == "test"


def test_pickle_payload_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"0.weight": Payload(marker)}, "__author__": "x"}, f)
    with pytest.raises(UnsafePickleError, match="posix.system|os.system"):
        Checkpointer(small_model()).load(str(path))
    with pytest.raises(UnsafePickleError):
        read_weights_file(str(path))   # the backbone's pretrained-weights reader
    assert not marker.exists()
    # the same payload inside a .pth: torch's weights-only loader refuses it
    pth = tmp_path / "evil.pth"
    torch.save({"model": {"0.weight": Payload(marker)}}, pth)
    with pytest.raises(pickle.UnpicklingError, match="weights_only|not loaded"):
        Checkpointer(small_model()).load(str(pth))
    assert not marker.exists()


def test_checkpoint_writes_are_atomic_and_readable_weights_only(tmp_path):
    model = small_model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3, 8, 8)).sum().backward()
    opt.step()
    ck = Checkpointer(model, save_dir=str(tmp_path), optimizer=opt)
    ck.save("model_0000009", iteration=9)
    names = sorted(os.listdir(tmp_path))
    assert names == ["last_checkpoint", "model_0000009.pth"]   # no temporary file left
    with open(tmp_path / "last_checkpoint") as f:
        assert f.read() == "model_0000009.pth"
    data = torch.load(tmp_path / "model_0000009.pth", weights_only=True)
    assert data["iteration"] == 9 and data["optimizer"]["state"]

    # a write that fails half-way (torch.save meets an object it cannot pickle after the
    # model's tensors) leaves the previous file whole and no temporary file
    class Unsaveable:
        def state_dict(self):
            return {"not picklable": lambda: 0}

    ck.add_checkpointable("broken", Unsaveable())
    with pytest.raises((AttributeError, pickle.PicklingError, TypeError)):
        ck.save("model_0000009", iteration=10)
    assert sorted(os.listdir(tmp_path)) == names
    assert torch.load(tmp_path / "model_0000009.pth", weights_only=True)["iteration"] == 9


def test_resume_with_no_readable_checkpoint_says_which_failed(tmp_path):
    for name in ("model_0000001.pth", "model_final.pth"):
        (tmp_path / name).write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="none of the 2 checkpoint"):
        Checkpointer(small_model(), save_dir=str(tmp_path)).resume_or_load("", resume=True)


def test_non_finite_weights_are_named():
    model = small_model()
    check_finite_weights(model, "ok.pth")
    with torch.no_grad():
        model[1].running_var[2] = float("nan")
    with pytest.raises(ValueError, match=r"1\.running_var.*diverged"):
        check_finite_weights(model, "bad.pth")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The toy tokenizer, trained on a tiny generated toy_shapes (a fresh clone has none)."""
    return make_toy_data(tmp_path_factory, num_train=4, num_val=1)[2]


def toy_cfg(*opts):
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(list(opts))
    return cfg


def test_checkpoint_period_zero_is_refused_before_training():
    with pytest.raises(ValueError, match="CHECKPOINT_PERIOD must be a positive"):
        Trainer(toy_cfg("SOLVER.CHECKPOINT_PERIOD", "0"))


def test_eval_only_refuses_random_and_non_finite_weights(tmp_path, tokenizer):
    args = argparse.Namespace(resume=False, eval_only=True)
    cfg = toy_cfg("OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", "",
                  "MODEL.TEXT_ENCODER.TOKENIZER", tokenizer)
    with pytest.raises(ValueError, match="needs weights"):
        train_net.evaluate(cfg, args)
    # NaN weights: refused with the parameter's name instead of detectron2's box error
    model = Trainer.build_model(cfg)
    state = model.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 4)
    state[name] = torch.full_like(state[name], float("nan"))
    path = tmp_path / "nan.pth"
    torch.save({"model": state}, path)
    cfg = toy_cfg("OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", str(path),
                  "MODEL.TEXT_ENCODER.TOKENIZER", tokenizer)
    with pytest.raises(ValueError, match=f"NaN or inf.*{name}|{name}.*"):
        train_net.evaluate(cfg, args)


def test_output_dir_of_another_run_is_refused_or_moved(tmp_path):
    from unip_v2.engine.output_dir import RunFolderInUseError, prepare_output_dir

    prepare_output_dir(str(tmp_path), resume=False, overwrite=False)   # empty: fine
    (tmp_path / "log.txt").write_text("x")
    (tmp_path / "config.yaml").write_text("x")
    prepare_output_dir(str(tmp_path), resume=False, overwrite=False)   # no results yet
    (tmp_path / "metrics.json").write_text('{"iteration": 1}\n')
    (tmp_path / "model_final.pth").write_bytes(b"w")
    with pytest.raises(RunFolderInUseError, match="metrics.json, model_final.pth"):
        prepare_output_dir(str(tmp_path), resume=False, overwrite=False)
    prepare_output_dir(str(tmp_path), resume=True, overwrite=False)    # continuing: fine
    prepare_output_dir(str(tmp_path), resume=False, overwrite=True)
    moved = [d for d in os.listdir(tmp_path) if d.startswith("overwritten-")]
    assert len(moved) == 1
    assert sorted(os.listdir(tmp_path / moved[0])) == ["metrics.json", "model_final.pth"]
    assert not (tmp_path / "metrics.json").exists()


def test_weights_subset_keeps_only_the_named_parts(tmp_path):
    from unip_v2.engine import save_weights_subset

    weights = {"image_encoder.backbone.w": torch.arange(3.0), "image_encoder.b": torch.ones(2),
               "image_encoderx.c": torch.zeros(1), "text_encoder.w": torch.ones(4)}
    src, dst = tmp_path / "full.pth", tmp_path / "part.pth"
    torch.save({"model": weights, "iteration": 5, "trainer": {"iteration": 5}}, src)
    assert save_weights_subset(str(src), str(dst), ["image_encoder."]) == 2
    got = torch.load(dst, weights_only=True)
    assert list(got) == ["model"]
    assert sorted(got["model"]) == ["image_encoder.b", "image_encoder.backbone.w"]
    assert torch.equal(got["model"]["image_encoder.backbone.w"], torch.arange(3.0))
    # a prefix that matches nothing is an error naming what the file holds, and writes nothing
    with pytest.raises(ValueError, match="image_encoder.*text_encoder"):
        save_weights_subset(str(src), str(tmp_path / "none.pth"), ["unified_decoder."])
    assert not (tmp_path / "none.pth").exists()
