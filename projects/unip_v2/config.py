"""unip-v2's config keys, added on top of detectron2's defaults.

Usage::

    from detectron2.config import get_cfg
    from unip_v2 import add_unip_v2_config

    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.merge_from_file("configs/Base-UniPerceiverV2.yaml")

Every key gets a comment saying what it does (tests/test_project_setup.py enforces it).
Defaults are Uni-Perceiver v2's (Table 7 and Appendix B) for the R50 model; the toy
configs shrink them.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_unip_v2_config"]


def add_unip_v2_config(cfg: CN) -> None:
    """Add unip-v2's keys (with their defaults) to a detectron2 config, in place."""
    # ---------------------------------------------------------------- op
    # Multi-scale deformable attention, the op of the region proposal network's
    # deformable encoder and decoder (unip_v2/layers/ms_deform_attn.py).
    cfg.MODEL.MS_DEFORM_ATTN = CN()
    # Implementation: "auto" | "reference" | "cpu" | "cuda". "auto" takes the compiled
    # kernel for the tensors' device when unip_v2._C has it, else the pure-PyTorch
    # reference. The environment variable UNIP_V2_MSDA_BACKEND overrides this key; see
    # unip_v2/layers/ms_deform_attn_backend.py.
    cfg.MODEL.MS_DEFORM_ATTN.BACKEND = "auto"

    # ---------------------------------------------------------------- backbone
    # Local file with ImageNet weights for the backbone alone ("" = random init). ResNet:
    # a torchvision state dict or a detectron2-style .pkl/.pth; Swin: a timm state dict
    # or the official Swin release ({"model": ...}). MODEL.WEIGHTS (a whole-model
    # checkpoint) is loaded after this and wins where both have a tensor.
    cfg.MODEL.BACKBONE.PRETRAINED = ""
    # Swin Transformer from timm as a detectron2 Backbone (MODEL.BACKBONE.NAME
    # "build_swin_backbone"), outputs res2..res5 at strides 4..32, NCHW.
    cfg.MODEL.SWIN = CN()
    # Channels of the patch embedding; stage i has EMBED_DIM * 2**i (tiny/small 96, base 128,
    # large 192).
    cfg.MODEL.SWIN.EMBED_DIM = 96
    # Blocks per stage (tiny [2,2,6,2]; small, base, large [2,2,18,2]).
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    # Attention heads per stage (tiny/small [3,6,12,24], base [4,8,16,32], large [6,12,24,48]).
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    # Side of the attention windows, in patches (7 for 224-px pretraining, 12 for 384-px).
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    # Hidden width of each block's MLP as a multiple of its channels.
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    # Stochastic depth rate, growing linearly to this value over the blocks.
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3
    # Which stage outputs the backbone returns (subset of res2..res5).
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]

    # ---------------------------------------------------------------- image encoder
    # f_image (Eq. 1-3, 8-9): pixel encoder + region proposal network + general region
    # proposals + global tokens (unip_v2/modeling/image_encoder/).
    cfg.MODEL.IMAGE_ENCODER = CN()
    # Backbone maps F0..F3 (strides 4, 8, 16, 32). F0 feeds only the mask branch (Eq. 8);
    # F1..F3 plus one extra stride-2 level on F3 enter the deformable encoder.
    cfg.MODEL.IMAGE_ENCODER.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # d, the width of the region proposal network (Table 7 hidden_dim).
    cfg.MODEL.IMAGE_ENCODER.HIDDEN_DIM = 256
    # Feature levels of the deformable encoder/decoder: F1..F3 + the extra levels made by
    # 3x3 stride-2 convs (4 = the paper's "4-scale setting", strides 8..64).
    cfg.MODEL.IMAGE_ENCODER.NUM_FEATURE_LEVELS = 4
    # Attention heads of the deformable encoder and decoder (Table 7 nheads).
    cfg.MODEL.IMAGE_ENCODER.NHEADS = 8
    # Deformable encoder layers (Table 7 enc_layers).
    cfg.MODEL.IMAGE_ENCODER.ENC_LAYERS = 6
    # Deformable decoder layers (Table 7 dec_layers).
    cfg.MODEL.IMAGE_ENCODER.DEC_LAYERS = 6
    # FFN width of encoder and decoder layers (Table 7 dim_feedforward).
    cfg.MODEL.IMAGE_ENCODER.DIM_FEEDFORWARD = 2048
    # Dropout in encoder and decoder layers (Table 7 dropout).
    cfg.MODEL.IMAGE_ENCODER.DROPOUT = 0.0
    # Sampling points per head and level in the encoder (Table 7 enc_n_points).
    cfg.MODEL.IMAGE_ENCODER.ENC_N_POINTS = 4
    # Sampling points per head and level in the decoder (Table 7 dec_n_points).
    cfg.MODEL.IMAGE_ENCODER.DEC_N_POINTS = 4
    # N, object queries chosen by two-stage selection (Table 7 num_queries: 300 R50,
    # 900 Swin).
    cfg.MODEL.IMAGE_ENCODER.NUM_QUERIES = 300
    # O, general region proposals kept by the objectness of the fused q_proposal and handed
    # to the unified decoder (Table 7 topk_queries).
    cfg.MODEL.IMAGE_ENCODER.TOPK_PROPOSALS = 200
    # Channels of the per-pixel mask map of Eq. 8 (dot product with MLP(q)).
    cfg.MODEL.IMAGE_ENCODER.MASK_DIM = 256
    # Normalisation of the input projections and mask branch convs ("GN" = GroupNorm(32)).
    cfg.MODEL.IMAGE_ENCODER.NORM = "GN"
    # Images are zero-padded (bottom/right) to a multiple of this before the backbone.
    cfg.MODEL.IMAGE_ENCODER.SIZE_DIVISIBILITY = 32
    # Initial decoder boxes from the two-stage masks ("mask2box", Mask DINO's mask-enhanced
    # anchor box initialisation) or from the selected anchors' refined boxes ("none").
    cfg.MODEL.IMAGE_ENCODER.INITIALIZE_BOX_TYPE = "mask2box"
    # What "mask2box" takes a mask pixel to be: "unit_square" (pixel x covers [x, x + 1),
    # the image's geometry) or "pixel_index" (Mask DINO's mask2box: boxes half a pixel
    # up-left and one pixel smaller). A converted Mask DINO checkpoint's config says
    # "pixel_index" (tools/convert_maskdino.py writes it).
    cfg.MODEL.IMAGE_ENCODER.MASK_BOX_CONVENTION = "unit_square"
    # Two-stage selection of encoder tokens whose anchor leaves (0.01, 0.99) or that lie on
    # padding: "exclude" (never chosen as queries: no image content, one shared score) or
    # "zero" (Mask DINO: features zeroed but selectable, two-stage boxes at 1). A converted
    # Mask DINO checkpoint's config says "zero" (tools/convert_maskdino.py writes it).
    cfg.MODEL.IMAGE_ENCODER.TWO_STAGE_INVALID_TOKENS = "exclude"
    # Side of the two-stage anchor boxes per encoder level, fine to coarse (stride 8
    # first); empty: 0.05 * 2**l (DINO's). A converted Mask DINO checkpoint's config carries
    # the sizes it was trained with (its "low2high" models: 0.4 at stride 8 ... 0.05 at 64).
    cfg.MODEL.IMAGE_ENCODER.TWO_STAGE_ANCHOR_SIZES = []
    # M of Eq. 9: side of the adaptive average pool applied to each proposal's mask logits.
    cfg.MODEL.IMAGE_ENCODER.MASK_POOL_SIZE = 28
    # M' of Eq. 3: attention pools over F3, each with its own learned query.
    cfg.MODEL.IMAGE_ENCODER.NUM_GLOBAL_POOLS = 10
    # Width of the tokens handed to the unified decoder (regional and global).
    cfg.MODEL.IMAGE_ENCODER.OUTPUT_DIM = 768

    # Contrastive denoising (DINO's CDN, as used by Mask DINO): noised copies of the ground
    # truth enter the decoder as extra queries during training.
    cfg.MODEL.IMAGE_ENCODER.DN = CN()
    # Turn denoising queries on in training (never used at inference).
    cfg.MODEL.IMAGE_ENCODER.DN.ENABLED = True
    # Denoising budget: groups = NUM_QUERIES_BUDGET // max ground-truth count in the batch,
    # each group holding a positive and a negative copy of every object.
    cfg.MODEL.IMAGE_ENCODER.DN.NUM_QUERIES_BUDGET = 100
    # Box noise scale lambda (Table 7 dn_box_noise_scale): corners move by up to
    # lambda * half the box side (positives) or between lambda and 2*lambda (negatives).
    # Table 7's dn_label_noise_ratio has no key: with one objectness class there is no
    # other label to flip to.
    cfg.MODEL.IMAGE_ENCODER.DN.BOX_NOISE_SCALE = 1.0

    # Hungarian matching costs (Table 7 *_cost_coef).
    cfg.MODEL.IMAGE_ENCODER.MATCHER = CN()
    # Focal-style objectness cost.
    cfg.MODEL.IMAGE_ENCODER.MATCHER.COST_CLASS = 2.0
    # L1 cost of normalised (cx, cy, w, h) boxes.
    cfg.MODEL.IMAGE_ENCODER.MATCHER.COST_BOX = 5.0
    # Negative generalised-IoU cost.
    cfg.MODEL.IMAGE_ENCODER.MATCHER.COST_GIOU = 2.0
    # Mean binary cross-entropy of mask logits at sampled points.
    cfg.MODEL.IMAGE_ENCODER.MATCHER.COST_MASK = 5.0
    # Dice cost of masks at sampled points.
    cfg.MODEL.IMAGE_ENCODER.MATCHER.COST_DICE = 5.0

    # Losses of the region proposal network (Table 7 *_loss_coef), applied to the
    # two-stage (encoder) output, every decoder layer and the denoising queries.
    cfg.MODEL.IMAGE_ENCODER.LOSS = CN()
    # Sigmoid focal loss on the objectness logit.
    cfg.MODEL.IMAGE_ENCODER.LOSS.CLASS_WEIGHT = 2.0
    # L1 loss on normalised (cx, cy, w, h).
    cfg.MODEL.IMAGE_ENCODER.LOSS.BOX_WEIGHT = 5.0
    # Generalised-IoU loss.
    cfg.MODEL.IMAGE_ENCODER.LOSS.GIOU_WEIGHT = 2.0
    # Binary cross-entropy of mask logits at sampled points.
    cfg.MODEL.IMAGE_ENCODER.LOSS.MASK_WEIGHT = 5.0
    # Dice loss at sampled points.
    cfg.MODEL.IMAGE_ENCODER.LOSS.DICE_WEIGHT = 5.0
    # Focal loss alpha (weight of the positive term).
    cfg.MODEL.IMAGE_ENCODER.LOSS.FOCAL_ALPHA = 0.25
    # Focal loss gamma (down-weights easy examples).
    cfg.MODEL.IMAGE_ENCODER.LOSS.FOCAL_GAMMA = 2.0
    # Points sampled per mask for matching and mask losses (112 x 112, Appendix B).
    cfg.MODEL.IMAGE_ENCODER.LOSS.TRAIN_NUM_POINTS = 112 * 112
    # Importance sampling in the mask loss: draw OVERSAMPLE_RATIO x points uniformly ...
    cfg.MODEL.IMAGE_ENCODER.LOSS.OVERSAMPLE_RATIO = 3.0
    # ... and keep this fraction as the most uncertain ones (|logit| smallest), the rest
    # uniform (PointRend / Mask2Former).
    cfg.MODEL.IMAGE_ENCODER.LOSS.IMPORTANCE_SAMPLE_RATIO = 0.75
    # Supervise the top-O selection head (objectness of the fused q_proposal) with the
    # focal loss against the final decoder layer's assignment; weight of that loss.
    cfg.MODEL.IMAGE_ENCODER.LOSS.PROPOSAL_CLASS_WEIGHT = 2.0

    # ---------------------------------------------------------------- text encoder
    # (keys of f_text: unip_v2/modeling/text_encoder/)
    # f_text (Eq. 4): RoBERTa's byte-level BPE tokenizer + RoBERTa, projected to OUTPUT_DIM.
    cfg.MODEL.TEXT_ENCODER = CN()
    # Local directory of a pretrained RoBERTa (config.json + weights, e.g. roberta-base as
    # written by save_pretrained); "" = random init from the architecture keys below, which
    # a pretrained model ignores (its own config.json wins).
    cfg.MODEL.TEXT_ENCODER.PRETRAINED = ""
    # Local directory with the tokenizer's vocab.json + merges.txt ("" = the PRETRAINED
    # directory). tools/train_toy_tokenizer.py trains one on the toy_shapes captions.
    cfg.MODEL.TEXT_ENCODER.TOKENIZER = ""
    # RoBERTa width H (roberta-base 768); used only without PRETRAINED.
    cfg.MODEL.TEXT_ENCODER.HIDDEN_SIZE = 768
    # RoBERTa transformer layers (roberta-base 12); used only without PRETRAINED.
    cfg.MODEL.TEXT_ENCODER.NUM_LAYERS = 12
    # RoBERTa attention heads (roberta-base 12); used only without PRETRAINED.
    cfg.MODEL.TEXT_ENCODER.NUM_HEADS = 12
    # RoBERTa FFN width (roberta-base 3072); used only without PRETRAINED.
    cfg.MODEL.TEXT_ENCODER.INTERMEDIATE_SIZE = 3072
    # RoBERTa position table size (roberta-base 514 = 512 tokens + the padding offset of 2);
    # used only without PRETRAINED.
    cfg.MODEL.TEXT_ENCODER.MAX_POSITION_EMBEDDINGS = 514
    # Most tokens per text, <s> and </s> included; a longer text raises (naming it and its
    # token count) unless the caller asks for truncation (keeping </s>), so two long
    # category names never share one embedding. 64 covers captions and category names; at
    # most MAX_POSITION_EMBEDDINGS - 2.
    cfg.MODEL.TEXT_ENCODER.CONTEXT_LENGTH = 64
    # Width of the returned token features (the unified decoder's); a Linear projects
    # RoBERTa's hidden size to it when they differ, identity otherwise.
    cfg.MODEL.TEXT_ENCODER.OUTPUT_DIM = 768

    # ---------------------------------------------------------------- unified decoder
    # (keys of g and its conditional MoE: unip_v2/modeling/unified_decoder/)
    # g (paper App. B): a 6-layer pre-LN Transformer of BERT-base width, no layer-scale.
    cfg.MODEL.UNIFIED_DECODER = CN()
    # Token width of g (the image and text encoders project to it).
    cfg.MODEL.UNIFIED_DECODER.WIDTH = 768
    # Number of Transformer layers.
    cfg.MODEL.UNIFIED_DECODER.DEPTH = 6
    # Attention heads per layer.
    cfg.MODEL.UNIFIED_DECODER.NUM_HEADS = 12
    # Hidden width of each FFN (GELU between its two linears).
    cfg.MODEL.UNIFIED_DECODER.FFN_DIM = 3072
    # Stochastic-depth rate, the same for every layer.
    cfg.MODEL.UNIFIED_DECODER.DROP_PATH = 0.1
    # Dropout on attention probabilities and on the attention / FFN outputs.
    cfg.MODEL.UNIFIED_DECODER.DROPOUT = 0.0
    # Conditional MoE in every FFN, routed on segment attributes (attributes.py); the gate
    # adds Gaussian noise of std 1 / NUM_EXPERTS to its logits in training only.
    cfg.MODEL.UNIFIED_DECODER.MOE = CN()
    # False: plain dense FFNs (the Table 3 ablation).
    cfg.MODEL.UNIFIED_DECODER.MOE.ENABLED = True
    # Experts per FFN.
    cfg.MODEL.UNIFIED_DECODER.MOE.NUM_EXPERTS = 8
    # Experts merged per segment (their softmax weights renormalised to sum to 1).
    cfg.MODEL.UNIFIED_DECODER.MOE.TOP_K = 2

    # ---------------------------------------------------------------- tasks
    # The generalist's tasks (names in unip_v2.modeling.tasks.TASK_REGISTRY), sharing one
    # image encoder, text encoder and unified decoder; each batch holds one of them.
    cfg.MODEL.TASKS = ["detection"]

    # ---------------------------------------------------------------- detection task
    # Detection and instance segmentation through class-name embeddings (UniPerceiverV2).
    cfg.MODEL.DETECTION = CN()
    # Weight of the unified class loss (Eq. 7) on proposals matched to ground truth.
    cfg.MODEL.DETECTION.CLASS_LOSS_WEIGHT = 1.0
    # Category names used at test time instead of DATASETS.TEST's thing_classes (open
    # vocabulary); [] = the dataset's names.
    cfg.MODEL.DETECTION.TEST_CLASS_NAMES = []
    # Images per process and iteration of a detection batch (Table 8: 1); 0 = the
    # single-task default SOLVER.IMS_PER_BATCH / number of processes.
    cfg.MODEL.DETECTION.BATCH_SIZE = 0

    # ---------------------------------------------------------------- classification task
    # Image classification: the image's <SPE> output against the class names (Sec. 4.3).
    cfg.MODEL.CLASSIFICATION = CN()
    # w_k, the weight of the classification loss.
    cfg.MODEL.CLASSIFICATION.LOSS_WEIGHT = 1.0
    # Label smoothing of the cross-entropy (0.1 in Uni-Perceiver's classification losses).
    cfg.MODEL.CLASSIFICATION.LABEL_SMOOTHING = 0.1
    # Side of the square input (224 px for R50, 384 for Swin in the paper).
    cfg.MODEL.CLASSIFICATION.IMAGE_SIZE = 224
    # Area fraction range of the training random resized crop.
    cfg.MODEL.CLASSIFICATION.CROP_SCALE = [0.08, 1.0]
    # Inference: shorter side resized to IMAGE_SIZE / TEST_CROP_RATIO, centre crop.
    cfg.MODEL.CLASSIFICATION.TEST_CROP_RATIO = 0.875

    # Samples per process and iteration of a classification batch (Table 8: 28); 0 = the
    # single-task default SOLVER.IMS_PER_BATCH / number of processes.
    cfg.MODEL.CLASSIFICATION.BATCH_SIZE = 0

    # ---------------------------------------------------------------- retrieval task
    # Image-text retrieval: the image's <SPE> output against the caption's, [<SPE>,
    # f_text(caption)] through g; symmetric InfoNCE over the batch (Sec. 4.3).
    cfg.MODEL.RETRIEVAL = CN()
    # w_k of each direction's loss (image-to-text and text-to-image; 0.5 in Uni-Perceiver).
    cfg.MODEL.RETRIEVAL.LOSS_WEIGHT = 0.5
    # Label smoothing of both directions' cross-entropy.
    cfg.MODEL.RETRIEVAL.LABEL_SMOOTHING = 0.1
    # Samples per process and iteration (Table 8: 28); 0 = SOLVER.IMS_PER_BATCH / processes.
    cfg.MODEL.RETRIEVAL.BATCH_SIZE = 0
    # Side of the square input (224 px for R50, 384 for Swin).
    cfg.MODEL.RETRIEVAL.IMAGE_SIZE = 224
    # Negatives from every process ("Gather Feature", Table 4): both sides' features are
    # all-gathered, gradients flow through the local part. No effect on one process.
    cfg.MODEL.RETRIEVAL.GATHER_FEATURES = True

    # ---------------------------------------------------------------- captioning task
    # Image captioning by <SPE> queries against the vocabulary (Uni-Perceiver v1, App. B).
    cfg.MODEL.CAPTIONING = CN()
    # w_k of the caption loss.
    cfg.MODEL.CAPTIONING.LOSS_WEIGHT = 1.0
    # Label smoothing of the per-word cross-entropy (none in Uni-Perceiver).
    cfg.MODEL.CAPTIONING.LABEL_SMOOTHING = 0.0
    # Samples per process and iteration (Table 8: 24); 0 = SOLVER.IMS_PER_BATCH / processes.
    cfg.MODEL.CAPTIONING.BATCH_SIZE = 0
    # Side of the square input (224 px for R50, 384 for Swin).
    cfg.MODEL.CAPTIONING.IMAGE_SIZE = 224
    # Beam search at inference: beams kept per step (2 in Uni-Perceiver).
    cfg.MODEL.CAPTIONING.BEAM_SIZE = 2
    # Most generated tokens per caption, </s> included (21 in Uni-Perceiver).
    cfg.MODEL.CAPTIONING.MAX_LENGTH = 21
    # Beam scores are log-probabilities / (generated tokens + 1) ** LENGTH_PENALTY; 0 = none.
    cfg.MODEL.CAPTIONING.LENGTH_PENALTY = 0.0

    # ---------------------------------------------------------------- MLM task
    # Masked language modelling: [<SPE>, f_text(tokens)] with masked words, each masked
    # position's output against the vocabulary (Sec. 4.3).
    cfg.MODEL.MLM = CN()
    # w_k of the MLM loss (0.5 in Table 8).
    cfg.MODEL.MLM.LOSS_WEIGHT = 0.5
    # Texts per process and iteration (Table 8: 256); 0 = SOLVER.IMS_PER_BATCH / processes.
    cfg.MODEL.MLM.BATCH_SIZE = 0
    # Fraction of tokens chosen for prediction (BERT's 15%).
    cfg.MODEL.MLM.MASK_RATIO = 0.15
    # Of the chosen tokens, the fraction replaced by <mask> (BERT's 80%).
    cfg.MODEL.MLM.MASK_TOKEN_FRACTION = 0.8
    # Of the chosen tokens, the fraction replaced by a random non-special token (BERT's 10%);
    # the rest stay unchanged.
    cfg.MODEL.MLM.RANDOM_TOKEN_FRACTION = 0.1

    # ---------------------------------------------------------------- multi-task training
    # When DATASETS.TRAIN names datasets of several tasks (Sec. 4.4): "unmixed" (every
    # iteration, all processes train the one task-dataset drawn from (SEED, iteration) with
    # the sampling ratios) or "mixed" (every iteration holds a batch of every task-dataset,
    # losses summed; Table 4's ablation, with AdamW).
    cfg.DATALOADER.TASK_SAMPLING = "unmixed"
    # Sampling ratio s_k of each DATASETS.TRAIN entry (normalised to sum 1); [] = every task
    # equal, split over its datasets in proportion to sqrt(dataset size) (Table 8).
    cfg.DATALOADER.SAMPLING_RATIOS = []

    # ---------------------------------------------------------------- input
    # Dataset mapper of the training loader: "coco_instance_lsj" (random resize by scale +
    # fixed-size crop, boxes recomputed from the cropped masks).
    cfg.INPUT.DATASET_MAPPER_NAME = "coco_instance_lsj"
    # Side of the square training crop (the paper crops 1600 x 1600 for COCO).
    cfg.INPUT.IMAGE_SIZE = 1024
    # Smallest random resize, as a fraction of IMAGE_SIZE (large-scale jitter).
    cfg.INPUT.MIN_SCALE = 0.1
    # Largest random resize, as a fraction of IMAGE_SIZE.
    cfg.INPUT.MAX_SCALE = 2.0

    # ---------------------------------------------------------------- solver
    # "ADAMW", "MT-ADAMW" (Sec. 4.4: each step's gradient normalised, weighted by its task's
    # w_k and compensated by its sampling ratio s_k; for multi-task training) or "SGD".
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # Learning-rate multiplier of the image encoder's backbone (0.1 for pretrained
    # encoders, Sec. 5.2).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Learning-rate multiplier of the rest of the image encoder (pixel encoder, proposal
    # decoder, general region proposals, global tokens): 1 when it trains from scratch, 0.1
    # when it starts from converted Mask DINO weights.
    cfg.SOLVER.IMAGE_ENCODER_MULTIPLIER = 1.0
    # Learning-rate multiplier of f_text (0.1 for the pretrained RoBERTa, Sec. 5.2); the
    # optimizer applies it to every parameter whose name starts with "text_encoder.".
    cfg.SOLVER.TEXT_ENCODER_MULTIPLIER = 0.1
    # Weight decay of embeddings (level/query/position embeddings, Swin's relative
    # position tables).
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
