"""Meta-architectures registered in detectron2's META_ARCH_REGISTRY."""
from .proposal_network import UniPerceiverV2ProposalNetwork, build_proposal_criterion

__all__ = ["UniPerceiverV2ProposalNetwork", "build_proposal_criterion"]
