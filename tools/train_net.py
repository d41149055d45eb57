#!/usr/bin/env python
r"""Train or evaluate a unip-v2 model with detectron2's engine.

    python tools/train_net.py --config-file configs/toy/uni_perceiver_v2_R50_tiny.yaml
    python tools/train_net.py --config-file configs/toy/uni_perceiver_v2_R50_tiny.yaml \
        --eval-only MODEL.WEIGHTS output/toy_uni_perceiver_v2/model_final.pth
    python tools/train_net.py --config-file ... --resume      # continue from the last checkpoint
    python tools/train_net.py --config-file ... --overwrite   # new run in a used OUTPUT_DIR
    python tools/train_net.py --config-file ... --num-gpus N  # one process per GPU (NCCL)
    torchrun --nproc-per-node N tools/train_net.py --config-file ... MODEL.DEVICE cpu  # gloo

Any trailing KEY VALUE pairs override the config. A new run refuses an OUTPUT_DIR that holds
another run's checkpoints or metrics unless --resume or --overwrite says what to do with them.
"""
import sys

import unip_v2  # noqa: F401  first: registers everything and makes detectron2 importable

from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from unip_v2 import add_unip_v2_config
from unip_v2.engine import Trainer
from unip_v2.engine.checkpointer import Checkpointer, check_finite_weights
from unip_v2.engine.launch import launch
from unip_v2.engine.output_dir import RunFolderInUseError, prepare_output_dir


def get_parser():
    parser = default_argument_parser()
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an OUTPUT_DIR that holds another run's "
                             "results (they move to an 'overwritten-<time>' subfolder)")
    return parser


def load_config(args):
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def setup(args):
    cfg = load_config(args)
    if not args.eval_only and comm.is_main_process():
        # before default_setup writes its log there
        prepare_output_dir(cfg.OUTPUT_DIR, resume=args.resume, overwrite=args.overwrite)
    default_setup(cfg, args)
    # default_setup logs detectron2's and fvcore's messages; unip_v2's go to the same places
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="unip_v2")
    return cfg


def evaluate(cfg, args):
    """--eval-only: the model from MODEL.WEIGHTS (or, with --resume, OUTPUT_DIR's newest
    readable checkpoint); refuses to evaluate random or non-finite weights."""
    model = Trainer.build_model(cfg)
    checkpointer = Checkpointer(model, save_dir=cfg.OUTPUT_DIR)
    resumed = args.resume and checkpointer.has_checkpoint()
    if not cfg.MODEL.WEIGHTS and not resumed:
        raise ValueError("--eval-only needs weights: set MODEL.WEIGHTS (e.g. "
                         "MODEL.WEIGHTS output/model_final.pth), or --resume with a checkpoint "
                         f"in OUTPUT_DIR ({cfg.OUTPUT_DIR}); a randomly initialised model "
                         "would be evaluated otherwise")
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
    check_finite_weights(model, "OUTPUT_DIR's checkpoint" if resumed else cfg.MODEL.WEIGHTS)
    results = Trainer.test(cfg, model)
    if comm.is_main_process():
        from detectron2.evaluation import verify_results

        verify_results(cfg, results)
    return results


def main(args):
    try:
        cfg = setup(args)
    except RunFolderInUseError as e:
        print(f"train_net: {e}", file=sys.stderr)
        sys.exit(2)
    if args.eval_only:
        return evaluate(cfg, args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = get_parser().parse_args()
    launch(main, args, device=load_config(args).MODEL.DEVICE)
