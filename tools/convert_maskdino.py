#!/usr/bin/env python
r"""Convert a Mask DINO checkpoint into unip-v2's image encoder (region proposal network).

Mask DINO is IDEA-Research/MaskDINO (detectron2 .pth or model-zoo .pkl); its backbone, pixel
decoder and predictor become unip-v2's backbone, pixel encoder and proposal decoder.

    python tools/convert_maskdino.py --config-file configs/proposal_network/R50_coco.yaml \
        --input maskdino_r50.pth --output unip_v2_r50_from_maskdino.pth
    python tools/train_net.py --config-file unip_v2_r50_from_maskdino.yaml --eval-only

Next to the checkpoint it writes its config (``--output`` with ``.yaml``): the target config,
the trailing overrides, MODEL.WEIGHTS, and the proposal-path conventions under which the
converted model computes what Mask DINO computes (``MODEL.IMAGE_ENCODER.
TWO_STAGE_INVALID_TOKENS zero``, the ``MASK_BOX_CONVENTION`` of ``--box-init``, Mask DINO's
INITIALIZE_BOX_TYPE, and Mask DINO's ``TWO_STAGE_ANCHOR_SIZES``; unip-v2's defaults differ,
see config.py).

Options: ``--decoder-layers 0,1,2,3,4,5`` picks which of Mask DINO's (9) decoder layers
to keep, as many as MODEL.IMAGE_ENCODER.DEC_LAYERS (default: the first ones);
``--box-init mask2box|bitmask|no`` (MODEL.MaskDINO.INITIALIZE_BOX_TYPE of the checkpoint's
Mask DINO config; its published COCO configs say mask2box);
``--class-head mean|fresh`` (the class head, see
``unip_v2.checkpoint.maskdino``); ``--feature-order auto|low2high|high2low`` overrides
the detection of Mask DINO's SEM_SEG_HEAD.FEATURE_ORDER; ``--report-json PATH`` saves the
report; trailing ``KEY VALUE`` pairs override the config, as in train_net.py. The config
must describe the checkpoint's backbone: for Mask DINO Swin-L, a leaf config with
``_BASE_: [proposal_network/R50_coco.yaml, swin/swin_large.yaml]`` (paths relative to it).
The number of queries is free (no weight depends on it).

The conversion itself (the mapping, the class head, the levels, what is approximate) lives in
``unip_v2.checkpoint.maskdino``, whose docstring has the details; this script reads the
checkpoint, builds the target model from the config on CPU, converts, writes the result and
prints the report.
"""
import argparse
import json
import logging
import os
import sys
from typing import Dict

import unip_v2  # noqa: F401  (first: registers everything and makes detectron2 importable)
from unip_v2.checkpoint.maskdino import (
    BOX_INIT_CONVENTIONS,
    build_target_model,
    convert_maskdino,
    converted_config,
    format_report,
    load_maskdino_checkpoint,
    save_converted,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="unip-v2 config of the target model")
    parser.add_argument("--input", required=True, help="Mask DINO checkpoint (.pth or .pkl)")
    parser.add_argument("--output", required=True, help="converted checkpoint (.pth)")
    parser.add_argument("--decoder-layers", default=None,
                        help="Mask DINO decoder layers to keep, e.g. 0,1,2,3,4,5 (default: the "
                             "first MODEL.IMAGE_ENCODER.DEC_LAYERS)")
    parser.add_argument("--class-head", choices=("mean", "fresh"), default="mean",
                        help="80 classes -> 1 objectness: mean of the rows (bias logsumexp), or "
                             "the fresh initialisation")
    parser.add_argument("--feature-order", choices=("auto", "low2high", "high2low"),
                        default="auto", help="Mask DINO's SEM_SEG_HEAD.FEATURE_ORDER (default: "
                                             "detected from the input projections)")
    parser.add_argument("--box-init", choices=sorted(BOX_INIT_CONVENTIONS), default="mask2box",
                        help="MODEL.MaskDINO.INITIALIZE_BOX_TYPE of the checkpoint's Mask DINO "
                             "config; sets the written config's initial-box convention")
    parser.add_argument("--report-json", default=None, help="also save the report here")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the fresh initialisation of the keys Mask DINO lacks")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    source = load_maskdino_checkpoint(args.input)
    model = build_target_model(args.config_file, args.opts, args.seed)
    state, report = convert_maskdino(source, model, decoder_layers=args.decoder_layers,
                                     class_head=args.class_head,
                                     feature_order=args.feature_order)
    save_converted(state, args.output, args.input)
    config_path = os.path.splitext(args.output)[0] + ".yaml"
    with open(config_path, "w") as f:
        f.write(converted_config(args.config_file, args.opts, os.path.abspath(args.output),
                                 args.box_init, report["target"]["maskdino_anchor_sizes"]).dump())
    report["input"], report["output"], report["config"], report["output_config"] = (
        args.input, args.output, args.config_file, config_path)
    print(format_report(report))
    print(f"wrote {args.output} and its config {config_path} (Mask DINO's proposal-path "
          f"conventions on; evaluate with: python tools/train_net.py --config-file "
          f"{config_path} --eval-only)")
    if args.report_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.report_json)), exist_ok=True)
        with open(args.report_json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ValueError, FileNotFoundError, TypeError) as e:
        sys.exit(f"convert_maskdino: error: {e}")
