"""Model stages in data-flow order: backbone -> image encoder -> text encoder -> unified
decoder (with the target bank) -> tasks, and the meta-architectures that wire them."""
from . import backbone  # noqa: F401  (registers build_swin_backbone)
from . import image_encoder  # noqa: F401
from . import meta_arch  # noqa: F401  (registers the meta-architectures)
from . import text_encoder  # noqa: F401
from . import unified_decoder  # noqa: F401
from . import tasks  # noqa: F401
from . import target_bank  # noqa: F401
