"""The project skeleton: unip_v2 imports, detectron2 works on this stack, config keys."""
import ast
import importlib
import io
import os
import sys
import tokenize

import pytest

import unip_v2  # first: makes detectron2 importable without its compiled ops

from detectron2.config import CfgNode, get_cfg

from unip_v2 import add_unip_v2_config
from unip_v2.utils.detectron2_compat import (
    Detectron2OpsUnavailableError,
    detectron2_has_compiled_ops,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_PY = os.path.join(REPO, "projects", "unip_v2", "config.py")
BASE_YAML = os.path.join(REPO, "configs", "Base-UniPerceiverV2.yaml")


def test_unip_v2_is_this_checkout():
    assert os.path.realpath(unip_v2.__file__) == os.path.realpath(
        os.path.join(REPO, "projects", "unip_v2", "__init__.py"))
    assert callable(unip_v2.add_unip_v2_config)


@pytest.mark.parametrize("module, name", [
    ("detectron2.config", "get_cfg"),
    ("detectron2.engine", "DefaultTrainer"),
    ("detectron2.modeling", "build_model"),
    ("detectron2.evaluation", "COCOEvaluator"),
    ("detectron2.checkpoint", "DetectionCheckpointer"),
    ("detectron2.utils.visualizer", "Visualizer"),
    ("detectron2.data.transforms", "ResizeShortestEdge"),
    ("detectron2.layers", "ShapeSpec"),
])
def test_detectron2_modules_import(module, name):
    assert getattr(importlib.import_module(module), name) is not None


def test_detectron2_environment_info_works():
    # engine.default_setup logs this at every start; it touches detectron2._C.
    from detectron2.utils.collect_env import collect_env_info

    assert "detectron2" in collect_env_info()


@pytest.mark.skipif(detectron2_has_compiled_ops(), reason="a compiled detectron2._C is installed")
def test_missing_detectron2_op_raises_clear_error():
    import detectron2
    from detectron2 import _C

    assert detectron2._C is _C is sys.modules["detectron2._C"]
    with pytest.raises(NotImplementedError) as info:
        _C.nms_rotated
    assert isinstance(info.value, Detectron2OpsUnavailableError)
    message = str(info.value)
    assert "detectron2._C.nms_rotated is unavailable" in message
    assert "build detectron2 from source" in message
    # Python's protocol probes get a plain AttributeError, so hasattr/copy/pickle behave.
    assert not hasattr(_C, "__wrapped__")


@pytest.mark.skipif(detectron2_has_compiled_ops(), reason="a compiled detectron2._C is installed")
def test_detectron2_op_user_fails_at_call_not_import():
    import torch
    from detectron2.structures import RotatedBoxes, pairwise_iou_rotated

    boxes = RotatedBoxes(torch.tensor([[5.0, 5.0, 4.0, 2.0, 30.0]]))
    with pytest.raises(NotImplementedError, match=r"detectron2\._C\.box_iou_rotated is unavailable"):
        pairwise_iou_rotated(boxes, boxes)


def test_config_defaults():
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    assert cfg.MODEL.MS_DEFORM_ATTN.BACKEND == "auto"


def test_base_yaml_merges():
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file(BASE_YAML)
    assert cfg.MODEL.MS_DEFORM_ATTN.BACKEND == "auto"


# -- every key that add_unip_v2_config adds is assigned on a commented line of config.py --

def _flat_keys(node, prefix=""):
    keys = set()
    for name, value in node.items():
        key = f"{prefix}{name}"
        keys.add(key)
        if isinstance(value, CfgNode):
            keys |= _flat_keys(value, key + ".")
    return keys


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _cfg_assignments(source):
    """{"MODEL.X.Y": (first_line, last_line)} for every `cfg.MODEL.X.Y = ...` statement."""
    found = {}
    for stmt in ast.walk(ast.parse(source)):
        if isinstance(stmt, ast.Assign):
            targets = stmt.targets
        elif isinstance(stmt, ast.AnnAssign):
            targets = [stmt.target]
        else:
            continue
        for target in targets:
            name = _dotted(target)
            if name and name.startswith("cfg."):
                found[name[len("cfg."):]] = (stmt.lineno, stmt.end_lineno)
    return found


def _uncommented(source):
    """Keys whose assignment has no comment on its own lines or on the line just above."""
    comment_lines, comment_only_lines = set(), set()
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            comment_lines.add(row)
            if lines[row - 1].strip().startswith("#"):
                comment_only_lines.add(row)
    bad = []
    for key, (first, last) in _cfg_assignments(source).items():
        on_statement = any(row in comment_lines for row in range(first, last + 1))
        if not on_statement and (first - 1) not in comment_only_lines:
            bad.append(key)
    return sorted(bad)


def test_comment_checker_catches_missing_comments():
    source = (
        "def add(cfg):\n"
        "    # a node\n"
        "    cfg.A = CN()\n"
        "    cfg.A.B = 1  # trailing comment\n"
        "    x = 1  # comment of another statement\n"
        "    cfg.A.C = 2\n"
        "    cfg.A.D = '# not a comment'\n"
        "\n"
        "    cfg.A.E = 3\n"
    )
    assert set(_cfg_assignments(source)) == {"A", "A.B", "A.C", "A.D", "A.E"}
    assert _uncommented(source) == ["A.C", "A.D", "A.E"]


def test_every_config_key_has_a_comment():
    with open(CONFIG_PY) as f:
        source = f.read()
    assigned = _cfg_assignments(source)
    base = get_cfg()
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    added = _flat_keys(cfg) - _flat_keys(base)
    assert added, "add_unip_v2_config added no keys"
    # Each added key must come from a literal `cfg.X.Y = ...` line (no loops or aliases that
    # would slip past the comment check) ...
    assert added <= set(assigned), f"keys not assigned literally in config.py: {sorted(added - set(assigned))}"
    # ... and each such line carries a comment.
    assert _uncommented(source) == []
