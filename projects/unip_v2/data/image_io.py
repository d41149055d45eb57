"""Reading image files that may be bad: one rule for the training mapper, evaluation and the
demo. A missing, truncated or non-image file is reported, never decoded half-way (PIL raises
on a truncated JPEG, where OpenCV would return the decoded part with grey below it).

What ``try_read_image`` adds to detectron2's ``read_image``:

* EXIF orientation with a size check. Given the size the dataset json records, the pixels
  are used in whichever orientation matches it (EXIF-rotated first, else the raw grid, see
  :func:`_orient`); an image matching neither is reported, so the caller skips it.
* High bit depth. PIL's ``convert("RGB")`` clips 16-bit grey ("I;16", or "I" for a 16-bit
  PNG) at 255, so nearly every pixel turns white while the annotations stay. Such images
  are reduced to 8 bits by keeping the high byte (``value >> 8``), which is what PIL itself
  does when it opens a 16-bit RGB PNG (as mode "RGB"), so grey and colour 16-bit files come
  out on the same scale. Modes whose value range is unknown (32-bit "I" other than a PNG's,
  float "F") are reported instead of being clipped to black or white.
"""
import logging
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import log_first_n

__all__ = ["UNREADABLE_IMAGE_ERRORS", "UnusableImageError", "try_read_image"]

logger = logging.getLogger(__name__)


class UnusableImageError(ValueError):
    """A file that decodes but cannot be used as it is: its size matches the dataset's in
    neither orientation, or its pixel mode has no known 8-bit scale."""


# Errors PIL raises for unreadable files: missing/truncated/not an image (OSError, which
# includes UnidentifiedImageError and FileNotFoundError), broken headers (SyntaxError,
# ValueError, UnusableImageError among them) and absurd sizes (DecompressionBombError).
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

_EXIF_ORIENTATION = 0x0112
# Orientations 5-8 transpose the pixel grid (width and height swap); 2-4 only flip it.
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
# 8-bit modes PIL converts to RGB / L itself (alpha, when present, is dropped).
_EIGHT_BIT_MODES = ("1", "L", "P", "PA", "LA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def try_read_image(
    file_name: str, format: str = "BGR", expected_size: Optional[Tuple[int, int]] = None
) -> Tuple[Optional[np.ndarray], str]:
    """Read an image for a dataset record.

    Args:
        file_name: path (anything detectron2's PathManager opens).
        format: PIL mode or "BGR", as for detectron2's ``read_image``.
        expected_size: (height, width) the dataset records for the image, or None to take
            the EXIF-rotated image whatever its size.

    Returns:
        (HWC uint8 image of size ``expected_size`` when given, "") or (None,
        "ErrorType: message") when the file is missing, corrupt, of an unsupported mode or of
        a size that matches ``expected_size`` in neither orientation.
    """
    try:
        return _read_image(file_name, format, expected_size), ""
    except UNREADABLE_IMAGE_ERRORS as e:
        return None, f"{type(e).__name__}: {e}"


def _read_image(file_name: str, format: str, expected_size: Optional[Tuple[int, int]]
                ) -> np.ndarray:
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        image.load()  # decode now, inside the file's context: truncation raises here
        is_png = image.format == "PNG"
        image = _orient(image, file_name, expected_size)
        image = _to_eight_bit(image, is_png, file_name)
        return utils.convert_PIL_to_numpy(image, format)


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8), 1 when absent or unreadable."""
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # malformed EXIF blocks raise all sorts (detectron2 issue #1885)
        return 1


def _orient(image: Image.Image, file_name: str, expected_size: Optional[Tuple[int, int]]
            ) -> Image.Image:
    """The image in the orientation the dataset's (height, width) calls for.

    The EXIF-rotated image (what viewers and most annotation tools show, and what
    detectron2's ``read_image`` returns) is preferred whenever its size matches, including
    the ambiguous cases (flips, square images), where the size cannot tell. If only the raw
    pixel grid matches, the dataset's width/height - and so its annotations - were made on
    the raw pixels by a tool that ignored EXIF (COCO itself has such images): rotating would
    misplace every annotation, so the raw pixels are used.

    Raises:
        UnusableImageError: ``expected_size`` matches neither orientation.
    """
    orientation = _exif_orientation(image)
    rotated = image
    if orientation in range(2, 9):
        rotated = ImageOps.exif_transpose(image)
    if expected_size is None:
        return rotated
    expected_h, expected_w = (int(v) for v in expected_size)
    if rotated.size == (expected_w, expected_h):
        return rotated
    if orientation in _SWAPPING_ORIENTATIONS and image.size == (expected_w, expected_h):
        log_first_n(
            logging.WARNING,
            f"{file_name} has EXIF orientation {orientation} but the dataset's width/height "
            f"({expected_w}x{expected_h}) are those of its raw pixels: its annotations were made "
            "on the raw pixels, so EXIF orientation is ignored for such images (logged once).",
            name=__name__,
        )
        return image
    raw_w, raw_h = image.size
    raise UnusableImageError(
        f"image size {raw_w}x{raw_h} (EXIF orientation {orientation}, "
        f"{rotated.size[0]}x{rotated.size[1]} after it) does not match the dataset's "
        f"width x height {expected_w}x{expected_h}"
    )


def _to_eight_bit(image: Image.Image, is_png: bool, file_name: str) -> Image.Image:
    """An image PIL converts to "RGB"/"L" without clipping: 8-bit modes as they are,
    16-bit grey reduced to "L" by its high byte (see the module docstring).

    Raises:
        UnusableImageError: a mode with no known value range (32-bit "I" not from a PNG,
            float "F", others), or 16-bit data that has no contrast left at 8 bits.
    """
    mode = image.mode
    if mode in _EIGHT_BIT_MODES:
        return image
    # PIL opens a 16-bit grey PNG as 32-bit "I" (values 0..65535); PNG has no other "I".
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and is_png):
        values = np.asarray(image).astype(np.int64)
        if values.min() < 0 or values.max() > 0xFFFF:
            raise UnusableImageError(f"mode {mode} values outside 0..65535 in {file_name}")
        eight = (values >> 8).astype(np.uint8)
        # 8-bit data stored in a 16-bit file (all values < 256) would become black.
        if eight.min() == eight.max() and values.min() != values.max():
            raise UnusableImageError(
                f"16-bit image values span only {values.min()}..{values.max()}: scaled from "
                "the full 16-bit range to 8 bits, no contrast is left"
            )
        return Image.fromarray(eight, mode="L")
    raise UnusableImageError(
        f"unsupported image mode {mode!r} (value range unknown; supported: "
        f"{', '.join(_EIGHT_BIT_MODES + _SIXTEEN_BIT_MODES)}, and 16-bit PNG)"
    )
