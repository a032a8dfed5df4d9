"""Encoded image bytes -> uint8 CHW tensor, with the training crop chosen before anything is resized.

The reference training transform (torchvision's classification preset) decodes the whole JPEG with PIL,
then RandomResizedCrop resizes the crop. Here the crop window is drawn first from the JPEG header (same
sampling as ``torchvision.transforms.RandomResizedCrop.get_params``), the image is decoded by a fast
library -- at a DCT-reduced size when the crop is at least twice the output -- and only the crop is
resized, by an antialiased resize (OpenCV INTER_AREA to shrink, INTER_LINEAR to enlarge). The result is
a uint8 tensor: float conversion and normalization happen on the device (``DeviceNormalize``).

Decoders (``data.decode.decoder``): ``pil`` (the reference, also the fallback for anything that is not a JPEG),
``simplejpeg`` (libjpeg-turbo), ``opencv`` (``cv2.imdecode``), ``torchvision`` (``torchvision.io``). Their
measured speed and their distance from the reference are in docs/decode.md.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from imgtrain.config import DataConfig, DecodeConfig
from imgtrain.registry import DECODERS

log = logging.getLogger(__name__)

# Tried in this order when the configured decoder's library is missing (fastest first, as measured).
FALLBACK_ORDER: tuple[str, ...] = (
    "libjpeg_roi",
    "simplejpeg_fast",
    "simplejpeg",
    "opencv",
    "torchvision",
    "pil",
)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
JPEG_MAGIC = b"\xff\xd8"
# Default of data.decode.max_image_pixels (docs/decode.md, "Hostile files"): 100 megapixels, above every image of
# the usual datasets and of 50 MP cameras, close to Pillow's own decompression-bomb warning
# (Image.MAX_IMAGE_PIXELS, ~89 MP). One such image costs a worker ~300 MB of RGB plus, when progressive, up
# to ~600 MB of DCT coefficients held until the last scan.
MAX_IMAGE_PIXELS = DecodeConfig.max_image_pixels
# Scans per JPEG: libjpeg's own progressive scripts use at most 10 (mozjpeg's a few more); every scan of a
# progressive file is a pass over all of its coefficients, so thousands of tiny scans burn CPU for minutes
# (libjpeg-turbo's djpeg -maxscans and its fuzzers cap them in the same way).
MAX_JPEG_SCANS = 100


class ImageLimitError(Exception):
    """An image above the decode limits (pixel count, JPEG scans): a bad sample, never retried with another
    decoder (deliberately not a ValueError, which the decoders catch to fall back)."""


@dataclass(frozen=True)
class DecodeLimits:
    """What a decoder accepts, checked from the header before any pixel is decoded."""

    max_pixels: int = MAX_IMAGE_PIXELS
    max_scans: int = MAX_JPEG_SCANS

    def check(self, data: bytes, height: int, width: int) -> None:
        if height * width > self.max_pixels:
            raise ImageLimitError(
                f"{width}x{height} image ({height * width / 1e6:.1f} MP) is above data.decode.max_image_pixels="
                f"{self.max_pixels}"
            )
        if data[:2] == JPEG_MAGIC and (n := jpeg_scan_count(data)) > self.max_scans:
            raise ImageLimitError(f"JPEG with {n} scans (more than {self.max_scans})")

    @property
    def max_memory(self) -> int:
        """libjpeg's memory limit: a progressive file's coefficients at 2 bytes per sample, for up to 4
        full-resolution components (CMYK) of the largest image allowed, plus working buffers."""
        return 8 * self.max_pixels + (64 << 20)


def decode_limits(cfg: DataConfig) -> DecodeLimits:
    """The configured limits (``data.decode.max_image_pixels``; the scan cap is fixed)."""
    return DecodeLimits(max_pixels=cfg.decode.max_image_pixels)


_SOS = b"\xff\xda"
_STANDALONE = frozenset(range(0xD0, 0xDA)) | {0x01}  # RSTn, SOI, EOI, TEM: markers without a length
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})  # SOF2/6/10/14: Huffman/arithmetic, (non)differential


def jpeg_scan_count(data: bytes) -> int:
    """An upper bound of the number of scans (SOS markers) of a progressive JPEG, 1 for a sequential one:
    the segments before the first scan are skipped by their lengths (an APPn payload may hold any bytes),
    then the SOS markers are counted (entropy-coded data cannot hold one: a 0xFF there is followed by 0x00
    or a restart marker). A sequential file's scans code every block of their components, so what they
    cost is bounded by the file's size; a progressive scan can skip 32767 blocks in one code. Counting only
    there keeps the ~5% it costs on a 100 KB file off the common baseline JPEG."""
    pos, n = 2, len(data)
    progressive = False
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return 0  # not a well-formed header: the decoder will say so
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:
            return 1 + data.count(_SOS, pos + 2) if progressive else 1
        progressive = progressive or marker in _PROGRESSIVE_SOF
        if marker in _STANDALONE:
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return 0


@dataclass(frozen=True)
class CropBox:
    """A window in the source image's pixel coordinates."""

    top: int
    left: int
    height: int
    width: int


@functools.lru_cache(maxsize=8)
def _log_ratio(ratio: tuple[float, float]) -> tuple[float, float]:
    # torchvision computes it in float32 on every call; cached, with the same float32 values
    lr = torch.log(torch.tensor(ratio))
    return float(lr[0]), float(lr[1])


def sample_crop(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = DEFAULT_RATIO,
    generator: torch.Generator | None = None,
) -> CropBox:
    """torchvision's ``RandomResizedCrop.get_params``, draw for draw (so that with ``generator=None``
    it consumes the global RNG exactly as torchvision does), with an optional generator."""
    area = height * width
    log_ratio = _log_ratio(tuple(ratio))
    # Drawn in place into two one-element tensors: the same draws as torchvision's fresh tensors
    # (torch.randint is empty(...).random_(low, high)), without five allocations and dispatches per crop,
    # which cost about as much as the draws (~25 µs of a 256 px shard sample's ~1 ms).
    f, n = torch.empty(1), torch.empty(1, dtype=torch.int64)
    for _ in range(10):
        target_area = area * f.uniform_(scale[0], scale[1], generator=generator).item()
        aspect = f.uniform_(log_ratio[0], log_ratio[1], generator=generator).exp_().item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = n.random_(0, height - h + 1, generator=generator).item()
            j = n.random_(0, width - w + 1, generator=generator).item()
            return CropBox(int(i), int(j), h, w)
    # Fallback to a central crop, as torchvision does.
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w)


def reduced_size(height: int, width: int, box: CropBox, out_h: int, out_w: int) -> tuple[int, int] | None:
    """The smallest full-image size (h, w) at which ``box`` still covers ``out_h x out_w`` pixels, when a
    DCT-scaled decode (1/2 and less) can deliver it, i.e. when the crop is at least twice the output in
    both directions; else None (decode at full size)."""
    if box.height < 2 * out_h or box.width < 2 * out_w:
        return None
    return math.ceil(height * out_h / box.height), math.ceil(width * out_w / box.width)


@functools.cache
def _cv2():
    import cv2

    # The loader parallelises over worker processes; OpenCV's own thread pool in every worker would
    # oversubscribe the cores (torch likewise runs one thread per worker).
    cv2.setNumThreads(1)
    return cv2


@functools.cache
def _simplejpeg():
    import simplejpeg

    return simplejpeg


# --------------------------------------------------------------------------------------------------
# Decoders: header size, and decode (optionally to a reduced size) to an RGB array.


class BaseDecoder:
    """Decodes to an HWC numpy array and resizes with OpenCV; PIL decodes anything that is not a JPEG.

    Subclasses override ``decode`` (and the image primitives when they work on another image type)."""

    name = "base"

    def __init__(self, limits: DecodeLimits | None = None):
        self.limits = limits or DecodeLimits()

    def size(self, data: bytes) -> tuple[int, int]:
        """(height, width) from the header, without decoding the pixels; raises ImageLimitError above the
        limits. Every decode entry point calls it first (decode_train, decode_eval, decode_full)."""
        h, w = self.header_size(data)
        self.limits.check(data, h, w)
        return h, w

    def header_size(self, data: bytes) -> tuple[int, int]:
        with pil_open(data) as im:
            return im.height, im.width

    def decode(self, data: bytes, min_size: tuple[int, int] | None = None):
        """RGB image, DCT-reduced to at least ``min_size`` (h, w) where the format allows it."""
        return np.asarray(pil_decode(data, min_size, self.limits))

    def decode_region(self, data: bytes, box: CropBox):
        """An image holding at least the window ``box`` (full-size coordinates), and where the window lies
        in it. Here the whole image; a decoder that can decode a region only overrides this."""
        return self.decode(data), box

    # Image primitives on what decode() returns.
    def dims(self, img) -> tuple[int, int]:
        return img.shape[0], img.shape[1]

    def crop(self, img, b: CropBox):
        return img[b.top : b.top + b.height, b.left : b.left + b.width]

    def resize(self, img, h: int, w: int):
        return resize_hwc(img, h, w)

    def crop_resize(self, img, b: CropBox, h: int, w: int):
        return self.resize(self.crop(img, b), h, w)

    def resize_window(self, img, window: tuple[float, float, float, float], h: int, w: int):
        """Resize the fractional ``window`` (left, top, right, bottom) to h x w (Pillow: exact geometry)."""
        from PIL import Image

        return np.array(Image.fromarray(np.ascontiguousarray(img)).resize((w, h), Image.BILINEAR, box=window))

    def hflip(self, img):
        return _cv2().flip(img, 1)  # contiguous output; numpy's [:, ::-1] copy is several times slower

    def to_tensor(self, img, out: torch.Tensor | None = None) -> torch.Tensor:
        """The uint8 CHW tensor; written into ``out`` (a slot of a batch) when given."""
        return _planar(img, out=out)


def into_slot(t: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``t``, or ``t`` copied into the batch slot ``out`` (same shape: copy_ alone would broadcast)."""
    if out is None:
        return t
    if out.shape != t.shape:
        raise ValueError(f"a {tuple(t.shape)} image does not fit the batch slot {tuple(out.shape)}")
    return out.copy_(t)


def _planar(img: np.ndarray, reverse: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """HWC -> contiguous CHW tensor (``out`` when given). cv2.split is ~3x faster than a strided copy
    (torch's permute + contiguous, or the collate stacking permuted views), which cost as much as the
    resize; it writes the planes straight into the CHW array (splitting into new arrays and stacking them
    cost 4x as much)."""
    shape = (img.shape[2], img.shape[0], img.shape[1])
    if out is not None and tuple(out.shape) != shape:
        raise ValueError(f"a {shape} image does not fit the batch slot {tuple(out.shape)}")
    t = out if out is not None else torch.from_numpy(np.empty(shape, np.uint8))
    planes = list(t.numpy()[::-1] if reverse else t.numpy())
    try:
        _cv2().split(np.ascontiguousarray(img), planes)
    except ImportError:  # the pil/torchvision decoders do not need OpenCV otherwise
        for c, plane in enumerate(planes):
            plane[...] = img[:, :, c]
    return t


def pil_open(data: bytes):
    """``Image.open``, whose own decompression-bomb check (above twice Image.MAX_IMAGE_PIXELS, ~179 MP)
    raises an ImageLimitError like ours."""
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageLimitError(str(e)) from None


def pil_decode(data: bytes, min_size: tuple[int, int] | None = None, limits: DecodeLimits | None = None):
    """Pillow's decode. Its header is checked against ``limits`` (the default ones when None) before the
    pixels are decoded, as Image.MAX_IMAGE_PIXELS does (Pillow's own check, an error above twice that
    global, stays in force too)."""
    im = pil_open(data)
    (limits or DecodeLimits()).check(data, im.height, im.width)
    if min_size is not None and im.format == "JPEG":
        im.draft("RGB", (min_size[1], min_size[0]))  # libjpeg's DCT scaling, size >= requested
    return im.convert("RGB")


@DECODERS.register("pil")
class PilDecoder(BaseDecoder):
    """The reference: Pillow decodes, crops and resizes (bilinear, antialiased), as torchvision's
    transforms do on PIL images."""

    name = "pil"

    def decode(self, data: bytes, min_size: tuple[int, int] | None = None):
        return pil_decode(data, min_size, self.limits)

    def dims(self, img) -> tuple[int, int]:
        return img.height, img.width

    def crop(self, img, b: CropBox):
        return img.crop((b.left, b.top, b.left + b.width, b.top + b.height))

    def resize(self, img, h: int, w: int):
        from PIL import Image

        return img if (img.height, img.width) == (h, w) else img.resize((w, h), Image.BILINEAR)

    def resize_window(self, img, window: tuple[float, float, float, float], h: int, w: int):
        from PIL import Image

        return img.resize((w, h), Image.BILINEAR, box=window)

    def hflip(self, img):
        from PIL import Image

        return img.transpose(Image.FLIP_LEFT_RIGHT)

    def to_tensor(self, img, out: torch.Tensor | None = None) -> torch.Tensor:
        return super().to_tensor(np.asarray(img), out)


@DECODERS.register("simplejpeg")
class SimplejpegDecoder(BaseDecoder):
    name = "simplejpeg"
    flags: dict = {}

    def __init__(self, limits: DecodeLimits | None = None):
        super().__init__(limits)
        # Fail here (and fall back) when simplejpeg, or OpenCV for the resize, is missing.
        _simplejpeg()
        _cv2()

    def header_size(self, data: bytes) -> tuple[int, int]:
        if data[:2] == JPEG_MAGIC:
            try:
                h, w, _, _ = _simplejpeg().decode_jpeg_header(data)
                return h, w
            except ValueError:
                pass
        return super().header_size(data)

    def decode(self, data: bytes, min_size: tuple[int, int] | None = None):
        if data[:2] == JPEG_MAGIC:
            try:
                if min_size is None:
                    return _simplejpeg().decode_jpeg(data, colorspace="RGB", **self.flags)
                # min_factor=2: factors between 1 and 2 decode slower than a full decode
                return _simplejpeg().decode_jpeg(
                    data,
                    colorspace="RGB",
                    min_height=min_size[0],
                    min_width=min_size[1],
                    min_factor=2,
                    **self.flags,
                )
            except ValueError:
                pass  # e.g. CMYK JPEGs, which libjpeg-turbo cannot convert to RGB: PIL can
        return super().decode(data, min_size)


@DECODERS.register("simplejpeg_fast")
class SimplejpegFastDecoder(SimplejpegDecoder):
    """simplejpeg with libjpeg-turbo's fast integer IDCT and nearest-neighbour chroma upsampling: faster,
    slightly further from the reference (still within the tested tolerance; docs/decode.md)."""

    name = "simplejpeg_fast"
    flags = {"fastdct": True, "fastupsample": True}


# The libjpeg-turbo the region decode was tested against (Debian bookworm's 2.1.5). Older releases had
# fuzzer-found memory bugs in jpeg_crop_scanline/jpeg_skip_scanlines with merged upsampling, the path
# this decode takes on files we do not control: below it, libjpeg_roi falls back to whole-image decode.
LIBJPEG_TURBO_MIN = 2001005


@functools.cache
def _jpegroi():
    try:
        from imgtrain.data.decode import _jpegroi  # the optional C extension (setup.py)
    except ImportError as e:
        raise ImportError(
            f"imgtrain's C extension _jpegroi is not built ({e}); `pip install -e .` builds it where a C "
            "compiler and libjpeg-turbo's headers are installed (scripts/install.sh installs them)"
        ) from None
    if not all(hasattr(_jpegroi, a) for a in ("LIBJPEG_PATH", "LimitError", "LIBJPEG_TURBO_VERSION_NUMBER")):
        # An editable install does not rebuild the extension when its source changes.
        raise ImportError(
            "imgtrain's C extension _jpegroi is older than its source: rebuild it with "
            "`pip install -e .` (or `python setup.py build_ext --inplace`)"
        )
    if _jpegroi.LIBJPEG_TURBO_VERSION_NUMBER < LIBJPEG_TURBO_MIN:
        raise ImportError(
            f"imgtrain's _jpegroi is built against libjpeg-turbo "
            f"{_jpegroi.LIBJPEG_TURBO_VERSION_NUMBER}, older than {LIBJPEG_TURBO_MIN}, the oldest "
            f"release its crop-window decode was tested with"
        )
    # The headers say what it was built with; the library loaded now may be another one (LD_LIBRARY_PATH,
    # a wheel built elsewhere, a container's older libjpeg).
    runtime = libjpeg_turbo_version(_jpegroi.LIBJPEG_PATH)
    if runtime is None or runtime < LIBJPEG_TURBO_MIN:
        found = "no libjpeg-turbo version string" if runtime is None else f"libjpeg-turbo {runtime}"
        raise ImportError(
            f"the libjpeg loaded by imgtrain's _jpegroi ({_jpegroi.LIBJPEG_PATH or 'unknown'}) "
            f"has {found}, older than {LIBJPEG_TURBO_MIN} or unknown"
        )
    return _jpegroi


_LJT_VERSION = re.compile(rb"libjpeg-turbo version (\d+)\.(\d+)\.(\d+)")


def libjpeg_turbo_version(path: str) -> int | None:
    """The version (as LIBJPEG_TURBO_VERSION_NUMBER: 2001005 for 2.1.5) that the libjpeg-turbo library file
    ``path`` carries (it embeds "libjpeg-turbo version X.Y.Z": the libjpeg API has no call that returns
    it), or None when the file has no such string or cannot be read."""
    try:
        with open(path, "rb") as f:
            m = _LJT_VERSION.search(f.read())
    except OSError:
        return None
    return None if m is None else int(m[1]) * 1_000_000 + int(m[2]) * 1_000 + int(m[3])


@DECODERS.register("libjpeg_roi")
class LibjpegRoiDecoder(SimplejpegFastDecoder):
    """Decodes only the crop window: libjpeg-turbo (the system's, through the small ``_jpegroi`` extension)
    skips the IDCT, upsampling and colour conversion outside it and stops after its last row; same fast
    IDCT and upsampling as ``simplejpeg_fast``. DCT-scaled decodes, headers and anything libjpeg refuses
    (CMYK, corrupt data) go through ``simplejpeg_fast`` / PIL as before."""

    name = "libjpeg_roi"

    def __init__(self, limits: DecodeLimits | None = None):
        super().__init__(limits)
        _jpegroi()

    def decode_region(self, data: bytes, box: CropBox):
        if data[:2] == JPEG_MAGIC:
            lim = self.limits
            try:
                buf, x0, width = _jpegroi().decode_crop(
                    data,
                    box.top,
                    box.left,
                    box.height,
                    box.width,
                    True,
                    lim.max_pixels,
                    lim.max_scans,
                    lim.max_memory,
                )
            except _jpegroi().LimitError as e:  # the C side's own check of the same limits
                raise ImageLimitError(str(e)) from None
            except ValueError:
                pass
            else:
                img = np.frombuffer(buf, np.uint8).reshape(box.height, width, 3)
                return img, CropBox(0, box.left - x0, box.height, box.width)
        return super().decode_region(data, box)


@DECODERS.register("simplejpeg_pillow")
class SimplejpegPillowDecoder(SimplejpegFastDecoder):
    """simplejpeg's fast decode, Pillow's resize: with pillow-simd installed (``scripts/install_pillow_simd.sh``)
    the resize is ~3x faster than OpenCV's INTER_AREA, the fastest path on full-size photos; on small images
    (shards prepared at 320/256 px) and with stock Pillow it is slower than ``simplejpeg_fast`` (docs/decode.md). The decode writes 4 bytes per pixel (RGBX), which is
    Pillow's own layout, so the pixels go into a Pillow image without a copy, and the crop window is
    resized in one pass (Pillow's bilinear with ``box``, the reference transform's filter)."""

    name = "simplejpeg_pillow"

    def __init__(self, limits: DecodeLimits | None = None):
        super().__init__(limits)
        from PIL import Image  # noqa: F401 - a core dependency; imported here to fail early

    def decode(self, data: bytes, min_size: tuple[int, int] | None = None):
        from PIL import Image

        if data[:2] == JPEG_MAGIC:
            try:
                sj = _simplejpeg()
                if min_size is None:
                    a = sj.decode_jpeg(data, colorspace="RGBX", **self.flags)
                else:
                    a = sj.decode_jpeg(
                        data,
                        colorspace="RGBX",
                        min_height=min_size[0],
                        min_width=min_size[1],
                        min_factor=2,
                        **self.flags,
                    )
                return Image.frombuffer("RGBX", (a.shape[1], a.shape[0]), a, "raw", "RGBX", 0, 1)
            except ValueError:
                pass
        return pil_decode(data, min_size, self.limits)

    def dims(self, img) -> tuple[int, int]:
        return img.height, img.width

    def crop(self, img, b: CropBox):
        return img.crop((b.left, b.top, b.left + b.width, b.top + b.height))

    def crop_resize(self, img, b: CropBox, h: int, w: int):
        return self.resize_window(img, (b.left, b.top, b.left + b.width, b.top + b.height), h, w)

    def resize(self, img, h: int, w: int):
        return PilDecoder.resize(self, img, h, w)

    def resize_window(self, img, window: tuple[float, float, float, float], h: int, w: int):
        from PIL import Image

        return img.resize((w, h), Image.BILINEAR, box=window)

    def hflip(self, img):
        return PilDecoder.hflip(self, img)

    def to_tensor(self, img, out: torch.Tensor | None = None) -> torch.Tensor:
        # One copy out of Pillow (4 bytes per pixel), then the planes: cheaper than converting to RGB first.
        a = np.asarray(img)
        planes = _cv2().split(a)
        return into_slot(torch.from_numpy(np.stack(planes[:3])), out)


@DECODERS.register("opencv")
class OpencvDecoder(BaseDecoder):
    """``cv2.imdecode`` (BGR), OpenCV resize, RGB at the end."""

    name = "opencv"

    def __init__(self, limits: DecodeLimits | None = None):
        super().__init__(limits)
        _cv2()

    def decode(self, data: bytes, min_size: tuple[int, int] | None = None):
        if data[:2] == JPEG_MAGIC:
            cv2 = _cv2()
            flag = cv2.IMREAD_COLOR
            if min_size is not None:
                h, w = self.header_size(data)
                for f, reduced in (
                    (8, cv2.IMREAD_REDUCED_COLOR_8),
                    (4, cv2.IMREAD_REDUCED_COLOR_4),
                    (2, cv2.IMREAD_REDUCED_COLOR_2),
                ):
                    if h // f >= min_size[0] and w // f >= min_size[1]:
                        flag = reduced
                        break
            img = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
            if img is not None:
                return img
        return np.ascontiguousarray(super().decode(data, min_size)[:, :, ::-1])

    # OpenCV's images stay BGR until the final, small crop: reversing the channels of the full image first
    # would hand cv2.resize a negative-stride array, which it copies whole.
    def to_tensor(self, img, out: torch.Tensor | None = None) -> torch.Tensor:
        return _planar(img, reverse=True, out=out)


@DECODERS.register("torchvision")
class TorchvisionDecoder(BaseDecoder):
    """torchvision.io's JPEG decode (libjpeg-turbo) to a CHW tensor, resized by torchvision's uint8 kernels.
    No DCT-scaled decode: torchvision.io.decode_jpeg has no scale option. Other formats go through PIL:
    torchvision's PNG decode crashed the process (SIGSEGV after "libpng error: IDAT: incorrect data
    check", torchvision 0.29) on corrupt PNGs in the decoder fuzz test."""

    name = "torchvision"

    def decode(self, data: bytes, min_size: tuple[int, int] | None = None):
        from torchvision.io import ImageReadMode, decode_jpeg

        if data[:2] == JPEG_MAGIC:
            try:
                return decode_jpeg(
                    torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB
                )
            except RuntimeError:
                pass
        return super().to_tensor(super().decode(data))

    def dims(self, img) -> tuple[int, int]:
        return img.shape[-2], img.shape[-1]

    def crop(self, img, b: CropBox):
        return img[:, b.top : b.top + b.height, b.left : b.left + b.width]

    def resize(self, img, h: int, w: int):
        return img if self.dims(img) == (h, w) else TF.resize(img, [h, w], antialias=True)

    def hflip(self, img):
        return img.flip(-1)

    def to_tensor(self, img, out: torch.Tensor | None = None) -> torch.Tensor:
        return into_slot(img, out)


def create_decoder(name: str, limits: DecodeLimits | None = None) -> BaseDecoder:
    """The named decoder, or (with a warning) the fastest one whose library is installed."""
    try:
        return DECODERS[name](limits)
    except ImportError as e:
        for other in FALLBACK_ORDER:
            if other == name:
                continue
            try:
                dec = DECODERS[other](limits)
            except ImportError:
                continue
            log.warning(
                "data.decode.decoder=%s is not available (%s); decoding with %s instead", name, e, other
            )
            return dec
        raise  # unreachable: PIL is a core dependency


# --------------------------------------------------------------------------------------------------
# Crop + resize on whatever the decoder returned.


def resize_hwc(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Antialiased resize with OpenCV: INTER_AREA to shrink, INTER_LINEAR to enlarge, one axis at a time
    when one shrinks and the other grows (INTER_AREA does not antialias a mixed resize)."""
    cv2 = _cv2()
    h, w = img.shape[:2]
    if (h, w) == (out_h, out_w):
        return img
    if out_h <= h and out_w <= w:
        return cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_AREA)
    if out_h >= h and out_w >= w:
        return cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    if out_w < w:
        img = cv2.resize(img, (out_w, h), interpolation=cv2.INTER_AREA)
    else:
        img = cv2.resize(img, (w, out_h), interpolation=cv2.INTER_AREA)
    return cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_LINEAR)


def crop_resize(
    decoder: BaseDecoder,
    data: bytes,
    size: tuple[int, int],
    box: CropBox,
    full: tuple[int, int] | None = None,
    flip: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode ``data`` and return ``box`` (full-size coordinates) resized to ``size`` (h, w) as a uint8 CHW
    tensor (``out`` when given), mirrored left-right if ``flip``. ``full`` is the header size (h, w) when
    already known."""
    full = full or decoder.size(data)
    reduced = reduced_size(full[0], full[1], box, size[0], size[1])
    if reduced is None:
        img, box = decoder.decode_region(data, box)
        img = decoder.crop_resize(img, box, size[0], size[1])
    elif (got := decoder.dims(img := decoder.decode(data, reduced))) == full:  # not a JPEG: not reduced
        img = decoder.crop_resize(img, box, size[0], size[1])
    else:
        # DCT-reduced: the window falls between the reduced image's pixels; an integer crop there would
        # shift it by up to a full-size pixel per reduction step, so resize the exact fractional window.
        sy, sx = got[0] / full[0], got[1] / full[1]
        window = (box.left * sx, box.top * sy, (box.left + box.width) * sx, (box.top + box.height) * sy)
        img = decoder.resize_window(img, window, size[0], size[1])
    return decoder.to_tensor(decoder.hflip(img) if flip else img, out)


def decode_full(decoder: BaseDecoder, data: bytes) -> torch.Tensor:
    decoder.size(data)  # the limits, from the header
    return decoder.to_tensor(decoder.decode(data))


def eval_box(height: int, width: int, resize: int, crop: int) -> tuple[tuple[int, int], CropBox]:
    """torchvision's Resize(shorter side = resize) then CenterCrop(crop): the resized size (h, w) and the
    crop window in the resized image, computed as torchvision computes them."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = resize, int(resize * long / short)
    new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    return (new_h, new_w), CropBox(top, left, crop, crop)


def decode_train(
    data: bytes,
    decoder: BaseDecoder,
    size: int,
    scale: tuple[float, float],
    hflip: float = 0.5,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RandomResizedCrop(size, scale, ratio) + RandomHorizontalFlip(hflip), fused with the decode, into
    ``out`` when given. Randomness comes from ``generator`` (or the global torch RNG): the crop, then one
    draw for the flip."""
    full = decoder.size(data)
    box = sample_crop(full[0], full[1], scale, ratio, generator)
    flip = hflip > 0 and bool(torch.rand(1, generator=generator).item() < hflip)
    return crop_resize(decoder, data, (size, size), box, full, flip, out)


def decode_eval(
    data: bytes, decoder: BaseDecoder, resize: int, crop: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Resize the shorter side to ``resize``, then center-crop ``crop`` x ``crop`` (into ``out`` if given)."""
    full = decoder.size(data)
    (new_h, new_w), box = eval_box(full[0], full[1], resize, crop)
    # A DCT-reduced decode when the image is at least twice the resized size; the resize target is unchanged.
    img = decoder.decode(data, reduced_size(full[0], full[1], CropBox(0, 0, full[0], full[1]), new_h, new_w))
    return decoder.to_tensor(decoder.crop(decoder.resize(img, new_h, new_w), box), out)
