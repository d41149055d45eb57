"""Meta-architectures registered in detectron2's META_ARCH_REGISTRY: the generalist and, as
its sibling, the image encoder alone (the region proposal network)."""
from .proposal_network import UniPerceiverV2ProposalNetwork
from .uni_perceiver_v2 import UniPerceiverV2

__all__ = ["UniPerceiverV2", "UniPerceiverV2ProposalNetwork"]
