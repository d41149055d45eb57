"""Meta-architectures registered in detectron2's META_ARCH_REGISTRY."""
from .proposal_network import UniPerceiverV2ProposalNetwork, build_proposal_criterion
from .uni_perceiver_v2 import UniPerceiverV2

__all__ = ["UniPerceiverV2", "UniPerceiverV2ProposalNetwork", "build_proposal_criterion"]
