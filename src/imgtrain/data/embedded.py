"""The embedded default dataset: scikit-learn's handwritten digits written out as an ImageFolder tree.

Writing real image files (instead of feeding the arrays) means the quickstart runs exactly the
file-based pipeline that ImageNet runs: directory scan, decode, augment, sharded sampling.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DIGITS_VERSION = "digits-v1"
VAL_EVERY = 5  # every 5th image (by index) goes to val/: a fixed, class-balanced ~20% split


def default_data_home() -> Path:
    return Path(os.environ.get("IMGTRAIN_DATA_HOME", Path.home() / ".cache" / "imgtrain"))


def ensure_digits(home: Path | None = None) -> Path:
    """Write the digits tree once (atomically) and return its root with train/ and val/."""
    home = Path(home) if home is not None else default_data_home()
    root = home / DIGITS_VERSION
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    from PIL import Image
    from sklearn.datasets import load_digits

    home.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    # 8x8 pixels with values 0..16 -> 8-bit grayscale PNG (lossless, so no JPEG artefacts on 64 pixels).
    images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=home))
    try:
        for i, (img, label) in enumerate(zip(images, digits.target, strict=True)):
            split = "val" if i % VAL_EVERY == 0 else "train"
            d = tmp / split / f"{int(label)}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="L").save(d / f"{i:04d}.png")
        try:
            # Several ranks may race to create it; the first rename wins, the others discard theirs.
            os.rename(tmp, root)
            log.info("wrote the embedded digits dataset (%d images) to %s", len(images), root)
        except OSError:
            if not (root / "train").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
