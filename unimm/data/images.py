"""Image loading for shards: confinement to the image root, checks, resizing, JPEG encoding.

Shards hold every image as JPEG (``KEY.N.jpg``). An image that needs no change (already a
JPEG in RGB or greyscale, upright, no larger than ``image_size``) is copied byte for byte;
anything else is decoded, turned upright by its EXIF orientation, flattened onto white if it
has transparency, resized so the shorter side is ``image_size`` (never upscaled, aspect kept)
and re-encoded at ``jpeg_quality``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import stat
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError


class ImageProblem(ValueError):
    """An image that cannot go into a shard; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    """JPEG bytes as stored in the shard, with their pixel size.

    ``copied`` marks bytes identical to the source file; a pool worker then sends ``data`` empty
    and the main process reads the file itself (cheaper than sending the bytes through a pipe).
    """

    data: bytes
    width: int
    height: int
    copied: bool = False
    source_size: int = 0


def read_image_source(source) -> bytes:
    """The encoded bytes of an image: a file (a path), or an image held in an input table
    (:class:`unimm.data.tables.EmbeddedImage`).

    Raises:
        ImageProblem: the file or the table cell cannot be read.
    """
    from unimm.data.tables import is_embedded, read_embedded
    from unimm.errors import UnimmError

    try:
        if is_embedded(source):
            return read_embedded(source)
        return Path(source).read_bytes()
    except OSError as exc:
        raise ImageProblem(f"image {source}: cannot read it ({exc.strerror or exc})") from None
    except UnimmError as exc:
        raise ImageProblem(str(exc)) from None


def resolve_image_source(value, root: str | Path):
    """A record's image value made readable: an image held in the input table as it is (only the
    table readers make one), a path resolved and confined by :func:`resolve_image_path`."""
    from unimm.data.tables import is_embedded

    return value if is_embedded(value) else str(resolve_image_path(value, root))


def resolve_image_path(value: str, root: str | Path) -> Path:
    """Resolve an image path written in a record against ``root``.

    The real path (symlinks followed) must lie inside the real ``root``: ``../``, absolute paths
    elsewhere and symlinks pointing out are refused, so a record cannot read arbitrary files.

    Raises:
        ImageProblem: the path leaves the root or no file is there.
    """
    root_real = _real_dir(str(root))
    # The folder's real path is cached (images share folders), so a file costs one lstat; only
    # a file that is itself a symlink is resolved in full.
    folder, name = os.path.split(os.path.join(root_real, value))
    candidate = os.path.join(_real_dir(folder), name)
    try:
        if name in ("", ".", "..") or stat.S_ISLNK(os.lstat(candidate).st_mode):
            candidate = os.path.realpath(candidate)
    except OSError:
        pass  # reported below as not found
    if os.path.commonpath([root_real, candidate]) != root_real:
        raise ImageProblem(
            f"image path {value!r} resolves to {candidate}, outside the image root {root_real}; "
            "keep images under --image-root (or point --image-root at their folder)"
        )
    if not os.path.isfile(candidate):
        raise ImageProblem(
            f"image {value!r} not found (looked for {candidate}); paths are relative to --image-root, "
            "which defaults to the input file's folder"
        )
    return Path(candidate)


@functools.lru_cache(maxsize=4096)
def _real_dir(folder: str) -> str:
    return os.path.realpath(folder)


def target_size(width: int, height: int, image_size: int | None) -> tuple[int, int]:
    """Size after resizing the shorter side to ``image_size`` (aspect kept, never upscaled)."""
    shorter = min(width, height)
    if image_size is None or shorter <= image_size:
        return width, height
    scale = image_size / shorter
    if width <= height:
        return image_size, max(1, round(height * scale))
    return max(1, round(width * scale)), image_size


def encode_image(
    path: str | Path,
    *,
    image_size: int | None = None,
    jpeg_quality: int = 90,
    verify: str = "full",
    max_pixels: int = 89_478_485,
) -> EncodedImage:
    """Read, check and (if needed) convert one image file to the JPEG stored in a shard.

    Args:
        path: an image file (any format Pillow reads).
        image_size: shorter side after resizing, or ``None`` to keep the size.
        jpeg_quality: quality used when the image is re-encoded.
        verify: ``full`` decodes the pixels (catches truncated files); ``header`` trusts them.
        max_pixels: the decompression-bomb limit.

    Raises:
        ImageProblem: unreadable, not an image, corrupt, or over ``max_pixels``.
    """
    raw = read_image_source(path)
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _encode(raw, image_size, jpeg_quality, verify, max_pixels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageProblem(_bomb_message(raw, max_pixels)) from None
    except UnidentifiedImageError:
        raise ImageProblem(f"{path} is not an image Pillow can read (corrupt or unknown format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageProblem):
            raise
        raise ImageProblem(f"cannot decode image {path}: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _bomb_message(raw: bytes, max_pixels: int) -> str:
    return (
        f"image is over the decompression-bomb limit of {max_pixels} pixels; if you trust it, "
        "raise --max-image-pixels (prepare.max_image_pixels)"
    )


def _encode(raw: bytes, image_size: int | None, quality: int, verify: str, max_pixels: int) -> EncodedImage:
    img = Image.open(io.BytesIO(raw))
    width, height = img.size
    if width * height > max_pixels:
        raise Image.DecompressionBombError("over limit")
    orientation = img.getexif().get(0x0112, 1) if img.format in ("JPEG", "TIFF", "WEBP", "PNG") else 1
    new_size = target_size(width, height, image_size)
    unchanged = new_size == (width, height) and orientation in (None, 1)
    if unchanged and img.format == "JPEG" and img.mode in ("RGB", "L"):
        if verify == "full":
            # Decoding at 1/8 scale still reads every entropy-coded block, so a truncated or
            # broken file fails here, at a fraction of the cost of a full decode.
            img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
            img.load()
        return EncodedImage(raw, width, height, copied=True, source_size=len(raw))
    if img.format == "JPEG" and orientation in (None, 1):
        img.draft("RGB", new_size)  # DCT-domain downscale first: much faster, deterministic
    img = ImageOps.exif_transpose(img)
    img = to_rgb(img)
    # The size is decided from the original pixels (a draft decode may round differently).
    final = (new_size[1], new_size[0]) if orientation in (5, 6, 7, 8) else new_size
    if final != img.size:
        img = img.resize(final, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return EncodedImage(out.getvalue(), img.size[0], img.size[1])


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as the 8-bit RGB it looks like, whatever its mode.

    Pillow's own ``convert("RGB")`` clips high-bit-depth pixels to 0..255, so a 16-bit PNG (mode
    ``I;16``/``I``) came out almost white; here they are scaled: 16-bit values by 1/257, a float
    image (``F``) by 255 when its values lie in [0, 1]. Transparency (``RGBA``, ``LA``, ``PA``, a
    palette with a transparent colour) is composed over white, as a viewer shows it; ``CMYK``,
    ``YCbCr``, ``1``, ``L``, ``P`` convert the usual way.
    """
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img


def _to_8bit(img: Image.Image) -> Image.Image:
    """A single-channel high-bit-depth image as ``L``: 16-bit integers scaled by 1/257, 32-bit
    integers above 65535 or floats above 1 clipped after scaling to their range."""
    import numpy as np

    pixels = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top = float(np.nanmax(pixels)) if pixels.size else 0.0
        scale = 255.0 if top <= 1.0 else 1.0
    elif img.mode == "I" and pixels.size and float(pixels.max()) <= 255:
        scale = 1.0  # 8-bit values stored as 32-bit integers
    else:
        scale = 1 / 257  # 16-bit range
    pixels = np.nan_to_num(pixels * scale, nan=0.0)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
