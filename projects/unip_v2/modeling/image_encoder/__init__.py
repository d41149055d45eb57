"""f_image: pixel encoder, proposal decoder (region proposal network), contrastive
denoising, matcher and criterion, general region proposals and global tokens."""
from .build import build_proposal_criterion
from .criterion import ProposalCriterion
from .denoising import DenoisingQueries, build_contrastive_denoising_queries
from .image_encoder import ImageEncoder, ImageEncoderOutput
from .image_input import ImagePreprocessor, proposal_instances
from .matcher import HungarianMatcher
from .pixel_encoder import PixelEncoder, PixelEncoderOutput
from .proposal_decoder import ProposalDecoder
from .region_proposals import GeneralRegionProposals, GlobalTokens

__all__ = [
    "DenoisingQueries", "GeneralRegionProposals", "GlobalTokens", "HungarianMatcher",
    "ImageEncoder", "ImageEncoderOutput", "ImagePreprocessor", "PixelEncoder",
    "PixelEncoderOutput", "ProposalCriterion", "ProposalDecoder",
    "build_contrastive_denoising_queries", "build_proposal_criterion", "proposal_instances",
]
