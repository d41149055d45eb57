"""Reading image files that may be bad: one rule for the training mapper, evaluation and the
demo. A missing, truncated or non-image file is reported, never decoded half-way (PIL raises
on a truncated JPEG, where OpenCV would return the decoded part with grey below it)."""
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from detectron2.data import detection_utils as utils

__all__ = ["UNREADABLE_IMAGE_ERRORS", "try_read_image"]

# Errors PIL raises for unreadable files: missing/truncated/not an image (OSError, which
# includes UnidentifiedImageError and FileNotFoundError), broken headers (SyntaxError,
# ValueError) and absurd sizes (DecompressionBombError).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def try_read_image(file_name: str, format: str = "BGR") -> Tuple[Optional[np.ndarray], str]:
    """(HWC uint8 image, "") through detectron2's ``read_image`` (EXIF orientation applied,
    ``format`` a PIL mode or "BGR"), or (None, "ErrorType: message") if it cannot be read."""
    try:
        return utils.read_image(file_name, format=format), ""
    except UNREADABLE_IMAGE_ERRORS as e:
        return None, f"{type(e).__name__}: {e}"
