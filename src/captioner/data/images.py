"""Reading images: anything image-like (a path, bytes, a file object, a PIL image, an array) becomes an
upright 8-bit RGB image or one ImageError line saying why not, and `preprocess` turns it into the encoder's
input. Hostile files (decompression bombs, truncated or huge files) are refused before they cost memory."""
from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

try:  # HEIC/HEIF (iPhone photos) through libheif (pi-heif: the decoder alone); AVIF Pillow reads by itself
    from pi_heif import register_heif_opener
except ImportError:  # an install without it reads every other format; HEIC files say they need it
    register_heif_opener = None
else:
    register_heif_opener()  # adds the format to Pillow's registry, as Pillow's own plugins do on import

if TYPE_CHECKING:
    from captioner.features.encoder import EncoderSpec

MAX_PIXELS = 64_000_000  # refuse larger images: decoding one would take GBs (decompression bombs)
# No valid PNG (deflate packs at most 1,032:1, 8 pixels a byte at 1 bit) or GIF (12-bit LZW codes of at most
# 4,096 pixels) holds more pixels per byte: a header that declares more is a truncated file or a bomb (a
# 39-byte GIF declaring a 7900x7900 canvas would otherwise be decoded to hundreds of MB).
MAX_PIXELS_PER_BYTE = 10_000
MAX_FILE_BYTES = 512 * 2**20  # an uncompressed 64-megapixel 16-bit RGB TIFF is 384 MB; files are read whole
# Large images are decoded with their shorter side reduced to between this and twice this: twice the
# largest encoder input (260), so the bicubic resize to the input still sees the detail it uses, while a
# 24-megapixel photo takes a few MB instead of 72 MB (Flickr-sized photos are not reduced at all).
DECODE_SIDE = 520
# The Lite checkpoints were converted from the TF models, which were trained on (x - 127) / 128
# (efficientnet_lite_builder.py: MEAN_RGB 127, STDDEV_RGB 128), not on the ImageNet mean/std.
# On 20 Flickr8k dog photos, lite2 puts a dog breed top-1 for 18/20 with this and 15/20 with mean/std.
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0


class ImageError(ValueError):
    """An image that cannot be used; the message is one line, "NAME: reason"."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit greyscale: Pillow's convert() would clip at 255 and turn most pixels white
        arr = np.asarray(img, dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # transparent pixels carry arbitrary colours; show them as white, as a browser would
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _source_name(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<bytes>"
    file_name = getattr(src, "name", None)  # an open file knows its path
    if isinstance(file_name, str):
        return file_name
    return "<image>" if isinstance(src, Image.Image) else f"<{type(src).__name__}>"


def _array_image(arr: np.ndarray, name: str) -> Image.Image:
    """HxW or HxWx{1,3,4} uint8 array -> PIL image; anything else is an ImageError."""
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))):
        raise ImageError(f"{name}: array of shape {arr.shape} and dtype {arr.dtype} is not an image "
                         "(expected HxWx3 uint8)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(arr))


def _read_source(src, name: str) -> bytes:
    """The encoded bytes of a path or file object, with the reason in one line when there are none."""
    if hasattr(src, "read"):
        if getattr(src, "seekable", lambda: False)():
            src.seek(0)  # as PIL.Image.open does: a BytesIO just written to is read from its start
        data = src.read()
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError(f"{name}: file object gave {type(data).__name__}, not bytes (open it with 'rb')")
        return bytes(data)
    path = Path(src)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except OSError as e:  # a symlink loop (ELOOP), a name too long, a folder we may not enter
        raise ImageError(f"{name}: {e.strerror or type(e).__name__}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{name}: is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{name}: not a regular file")
    if st.st_size == 0:
        raise ImageError(f"{name}: empty file (0 bytes)")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageError(f"{name}: {st.st_size:,} bytes is over the {MAX_FILE_BYTES:,}-byte limit for an image file")
    try:
        return path.read_bytes()  # read once; no file handle outlives the call
    except OSError as e:
        raise ImageError(f"{name}: unreadable ({e.strerror or type(e).__name__})") from None


def load_image(src: str | Path | bytes | Image.Image, name: str | None = None,
               max_pixels: int = MAX_PIXELS, min_side: int | None = DECODE_SIDE) -> Image.Image:
    """Open anything image-like as an upright 8-bit RGB image, or raise ImageError("NAME: reason").

    `src` is a path, bytes, a binary file object (BytesIO, open(..., "rb")), a PIL image or an HxWx3
    uint8 array. Encoded images are reduced by a whole factor as they are decoded, the shorter side to no
    less than `min_side` pixels (JPEG by DCT scaling, other formats right after decoding), so a huge photo
    never stays in memory at full size; None keeps the full size. Only the first frame of an animation is
    decoded.
    """
    if name is None:
        name = _source_name(src)
    try:
        if isinstance(src, Image.Image):
            img = src
        elif isinstance(src, np.ndarray):
            img = _array_image(src, name)
        elif isinstance(src, (bytes, bytearray, memoryview, str, os.PathLike)) or hasattr(src, "read"):
            data = bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else _read_source(src, name)
            if not data:
                raise ImageError(f"{name}: empty (0 bytes)")
            img = Image.open(io.BytesIO(data))
            pixels = img.width * img.height
            # checked on the header, before decoding anything
            if pixels > max_pixels:
                raise ImageError(f"{name}: {img.width}x{img.height} pixels is over the {max_pixels:,} limit")
            if img.format in ("PNG", "GIF") and pixels > len(data) * MAX_PIXELS_PER_BYTE:
                raise ImageError(f"{name}: declares {img.width}x{img.height} pixels but is only {len(data):,} "
                                 "bytes: truncated, or a decompression bomb")
            if min_side and img.format == "JPEG":
                img.draft(None, (min_side, min_side))  # DCT scaling: decodes at 1/2, 1/4 or 1/8 size
        else:
            raise ImageError(f"{name}: a {type(src).__name__} is not an image (expected a path, bytes, a "
                             "binary file object, a PIL image or an HxWx3 uint8 array)")
        if img.width < 1 or img.height < 1:
            raise ImageError(f"{name}: image has no pixels")
        img.seek(0)  # first frame of an animation
        img.load()   # decode now, so a truncated file fails here and not later
        if min_side and img is not src and min(img.size) // min_side > 1:
            # reduce() averages values: palette indices and hues must become colours first, and it cannot
            # take 1-bit or 16-bit images
            if img.mode == "1":
                img = img.convert("L")
            elif img.mode in ("P", "PA", "HSV") or img.mode.startswith("I;16"):
                img = _to_rgb(img)
            img = img.reduce(min(img.size) // min_side)  # box average, aspect kept; shorter side >= min_side
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: too many pixels ({_one_line(e)})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (unknown or damaged format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, TypeError) as e:
        raise ImageError(f"{name}: truncated or corrupt ({_one_line(e)})") from None


def preprocess(img: Image.Image, spec: EncoderSpec) -> np.ndarray:
    """RGB image -> float32 (3, S, S): bicubic resize to the encoder's input, then (x - 127) / 128."""
    s = spec.input_size
    img = _to_rgb(img).resize((s, s), Image.BICUBIC)
    x = (np.asarray(img, dtype=np.float32) - PIXEL_MEAN) / PIXEL_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))
