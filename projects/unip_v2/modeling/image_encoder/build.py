"""The region proposal network's matcher and losses from the config."""
from .criterion import ProposalCriterion
from .matcher import HungarianMatcher

__all__ = ["build_proposal_criterion"]


def build_proposal_criterion(cfg) -> ProposalCriterion:
    """MODEL.IMAGE_ENCODER.{MATCHER,LOSS} -> ProposalCriterion (Table 7's costs and weights)."""
    m, loss = cfg.MODEL.IMAGE_ENCODER.MATCHER, cfg.MODEL.IMAGE_ENCODER.LOSS
    matcher = HungarianMatcher(m.COST_CLASS, m.COST_BOX, m.COST_GIOU, m.COST_MASK, m.COST_DICE,
                               loss.TRAIN_NUM_POINTS, loss.FOCAL_ALPHA, loss.FOCAL_GAMMA)
    weights = {"ce": loss.CLASS_WEIGHT, "bbox": loss.BOX_WEIGHT, "giou": loss.GIOU_WEIGHT,
               "mask": loss.MASK_WEIGHT, "dice": loss.DICE_WEIGHT,
               "proposal_ce": loss.PROPOSAL_CLASS_WEIGHT}
    return ProposalCriterion(matcher, weights, loss.TRAIN_NUM_POINTS, loss.OVERSAMPLE_RATIO,
                             loss.IMPORTANCE_SAMPLE_RATIO, loss.FOCAL_ALPHA, loss.FOCAL_GAMMA)
