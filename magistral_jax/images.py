"""Image loading and preprocessing, exactly as mistral-common does it (its encoder is reused).

An image becomes pixels and tokens: converted to RGB (transparency composited over white),
downscaled so its longest edge fits `image_size` (1540), resized with bicubic interpolation to
the next multiples of `patch_size * spatial_merge_size` (28), normalised with CLIP's mean and
std, as float32 `[3, H, W]`; its tokens are `([IMG] * columns + [IMG_BREAK]) * rows` with the
last `[IMG_BREAK]` replaced by `[IMG_END]`, one `[IMG]` per merged 2 x 2 patch block.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from magistral_jax.config import VisionConfig


class ImageError(ValueError):
    """An image cannot be read or does not fit the model."""


def _encoder(cfg: VisionConfig):
    from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs

    return ImageEncoder(
        ImageConfig(
            image_patch_size=cfg.patch_size, max_image_size=cfg.image_size, spatial_merge_size=cfg.spatial_merge_size
        ),
        SpecialImageIDs(img=cfg.image_token_id, img_break=cfg.image_break_token_id, img_end=cfg.image_end_token_id),
    )


def to_pil(image: Any, name: str = "image"):
    """A PIL image from a PIL image, a uint8 array (HW grayscale, HWC with 1, 3 or 4 channels) or
    encoded bytes; `ImageError` naming `name` otherwise."""
    from PIL import Image

    if isinstance(image, bytes | bytearray):
        try:
            image = Image.open(io.BytesIO(image))
            image.load()
        except Exception as e:
            raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ImageError(
                f"{name}: a uint8 array [H, W] or [H, W, 1|3|4] is expected, got {image.dtype}{image.shape}"
            )
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    elif not isinstance(image, Image.Image):
        raise ImageError(f"{name}: an image (PIL, uint8 array or bytes) is expected, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ImageError(f"{name}: the image is empty ({image.width} x {image.height} pixels)")
    return image


def load_image(path: str | os.PathLike[str]):
    """A PIL image from a file; `ImageError` for a missing or corrupted file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror})") from None
    return to_pil(data, path)


def encode_image(image: Any, cfg: VisionConfig, name: str = "image") -> tuple[list[int], np.ndarray]:
    """The image's tokens and its preprocessed pixels (float32 `[3, H, W]`), as mistral-common."""
    from mistral_common.protocol.instruct.chunk import ImageChunk

    encoding = _encoder(cfg)(ImageChunk(image=to_pil(image, name)))
    return list(encoding.tokens), np.asarray(encoding.image, np.float32)


def image_tokens(pixels: np.ndarray, cfg: VisionConfig) -> list[int]:
    """The tokens of preprocessed pixels `[3, H, W]` (H and W multiples of patch x merge)."""
    unit = cfg.patch_size * cfg.spatial_merge_size
    _, h, w = pixels.shape
    if h % unit or w % unit or h == 0 or w == 0:
        raise ImageError(f"pixels of shape {pixels.shape}: height and width must be positive multiples of {unit}")
    rows, cols = h // unit, w // unit
    tokens = ([cfg.image_token_id] * cols + [cfg.image_break_token_id]) * rows
    tokens[-1] = cfg.image_end_token_id
    return tokens
