#!/usr/bin/env python
"""Train or evaluate a unip-v2 model with detectron2's engine.

    python tools/train_net.py --config-file configs/toy/proposal_network_R18.yaml
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file ... --resume      # continue from last_checkpoint
    python tools/train_net.py --config-file ... --num-gpus N  # one process per GPU (untested yet)

Any trailing KEY VALUE pairs override the config.
"""
import unip_v2  # noqa: F401  first: registers everything and makes detectron2 importable

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm

from unip_v2 import add_unip_v2_config
from unip_v2.engine import Trainer


def setup(args):
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            from detectron2.evaluation import verify_results

            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
