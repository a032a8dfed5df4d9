"""ImageFolder-style dataset that hands each file's bytes to the decoding transform and survives bad files."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import get_worker_info

from imgtrain.data.decode.cpu import create_decoder, decode_full
from imgtrain.errors import DataError
from imgtrain.internals.shared_memory import shared_bytes

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class SampleRef:
    """What the batch sampler hands to the dataset: an index and the weight its loss gets.

    Weight 0 marks padding that only keeps ranks in step at the end of an epoch: it is decoded and run
    through the model but contributes nothing to the gradient or the accuracy counts.
    """

    index: int
    weight: float = 1.0
    epoch: int = 0  # carried with the index because persistent workers hold their own dataset copy


def sample_rng_scope():
    """Where a sample's seeded draws happen: in a loader worker the global generator is the worker's own
    and is reseeded for every sample, so nothing needs restoring; in the main process (``data.workers=0``)
    its state is saved and restored around the sample (``fork_rng``, which copies the generator's state
    twice: several percent of a small sample's cost)."""
    if get_worker_info() is not None:
        return contextlib.nullcontext()
    return torch.random.fork_rng(devices=[])


def scan_classes(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise DataError(f"data split directory not found: {split_dir}")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {split_dir} (expected {split_dir}/<class>/<image files>)")
    return classes


def scan_samples(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    """The image files of each class folder, in a fixed order (directories by path, files by name).

    Only regular files are samples (a FIFO or a device would block or never end). Symbolic links are
    followed while their target stays under ``split_dir``'s real path; a link that leads outside it is
    skipped with one warning (a hostile dataset must not make imgtrain read, or ``imgtrain prepare``
    publish, files from elsewhere on the host): link the files in, or copy them, to train on them.
    """
    root = os.path.realpath(split_dir)
    skipped: dict[str, list[str]] = {"outside": [], "special": []}
    samples: list[tuple[str, int]] = []
    for idx, c in enumerate(classes):
        for dirpath, files in sorted(_walk_regular(os.fspath(split_dir / c), root, skipped)):
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), idx))
    for what, paths in (
        ("link outside it", skipped["outside"]),
        ("are not regular files (FIFOs, sockets, devices)", skipped["special"]),
    ):
        if paths:
            log.warning(
                "skipping %d entries under %s that %s, e.g. %s", len(paths), split_dir, what, paths[0]
            )
    if not samples:
        raise DataError(f"no image files under {split_dir} (extensions: {', '.join(IMG_EXTENSIONS)})")
    return samples


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _walk_regular(top: str, root: str, skipped: dict[str, list[str]]):
    """(directory, names of its regular files) for ``top`` and every directory below it, as
    ``os.walk(top, followlinks=True)`` lists them, minus what lies outside ``root`` (real paths), what is
    not a regular file, and links back to a directory being walked (a loop). The entries' types come from
    the directory listing: only links cost a ``realpath``."""
    stack: list[tuple[str, frozenset[str]]] = [(top, frozenset())]
    while stack:
        d, above = stack.pop()
        real = os.path.realpath(d)
        if not _under(real, root):
            skipped["outside"].append(d)
            continue
        if real in above:
            continue
        try:
            entries = list(os.scandir(d))
        except OSError:  # unreadable: os.walk skips it too
            continue
        files = []
        for e in entries:
            if e.is_symlink():
                target = os.path.realpath(e.path)
                if not _under(target, root):
                    skipped["outside"].append(e.path)
                elif os.path.isdir(target):
                    stack.append((e.path, above | {real}))
                elif os.path.isfile(target):
                    files.append(e.name)
                else:
                    skipped["special"].append(e.path)
            elif e.is_dir(follow_symlinks=False):
                stack.append((e.path, above | {real}))
            elif e.is_file(follow_symlinks=False):
                files.append(e.name)
            else:
                skipped["special"].append(e.path)
        yield d, files


# Largest file read as one sample: above what an image within data.decode.max_image_pixels's default can need
# (100 MP at 8 bytes per pixel, 16-bit RGBA uncompressed, is 800 MB). A bigger file is a bad sample.
MAX_FILE_BYTES = 1 << 30


def read_regular_file(path: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes (checked on the open
    file: the scan's view may be stale). Opened non-blocking, so that a FIFO fails instead of waiting."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        if st.st_size > limit:
            raise OSError(f"{path} is larger than {limit} bytes")
        # read(n) allocates n bytes up front: ask for the file's size (+1 to see a file that grew since),
        # never for the limit, which would cost a 1 GiB allocation per image (and fail under a memory cap).
        data = f.read(st.st_size + 1)
    if len(data) > st.st_size:
        raise OSError(f"{path} changed while it was read")
    return data


class ImageFolderDataset(torch.utils.data.Dataset):
    """``root/<class>/<file>`` -> (uint8 CHW tensor, label, weight, bad path or "").

    ``transform`` takes the file's encoded bytes (see :mod:`imgtrain.data.decode.cpu`), so that the decode can
    be fused with the crop; without one the image is decoded at full size.

    Decoding and augmentation stay in uint8 (cheap to move between processes); normalization happens on
    the device. A file that fails to decode yields a zero image with weight 0 and its path, so that the
    main process can name it, count it and drop it from the batch: one bad JPEG never stops a run.

    Augmentation randomness is seeded per (seed, epoch, index), so a sample's crop does not depend on
    the worker, the rank, the world size or a resume: that is what makes resume bit-exact.
    """

    def __init__(
        self,
        split_dir: Path,
        classes: list[str],
        transform: Callable | None,
        seed: int = 0,
        image_size: int = 224,
    ):
        self.split_dir = split_dir
        self.classes = classes
        self.samples = scan_samples(split_dir, classes)
        self.transform = transform
        self.seed = seed
        self.image_size = image_size
        self.decoder = create_decoder("pil")  # only without a transform (full-size decode)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, ref: SampleRef | int):
        return self.load(ref if isinstance(ref, SampleRef) else SampleRef(int(ref)))

    def __getitems__(self, refs: list[SampleRef]):
        return load_batch(self, refs)

    def load(self, ref: SampleRef, out: torch.Tensor | None = None):
        """One sample; its image written into ``out`` (a batch slot) when given."""
        path, label = self.samples[ref.index]
        with sample_rng_scope():
            # The CPU generator only: torch.manual_seed would also queue a lazy seeding of every
            # accelerator backend, formatting a stack trace each time (milliseconds per sample).
            torch.default_generator.manual_seed((self.seed * 1_000_003 + ref.epoch) * 10_000_019 + ref.index)
            try:
                data = read_regular_file(path)
                if self.transform is None:
                    img = decode_full(self.decoder, data)
                else:
                    img = self.transform(data) if out is None else self.transform(data, out)
            except Exception as e:  # noqa: BLE001 - any decode failure is a bad file, by design
                log.warning("skipping unreadable image %s: %s", path, e)
                return blank(self.image_size, out), label, 0.0, path
        return img, label, ref.weight, ""


def blank(size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The zero image that stands in for an unreadable sample."""
    return torch.zeros(3, size, size, dtype=torch.uint8) if out is None else out.zero_()


@dataclass(frozen=True)
class FilledBatch:
    """A batch that :func:`load_batch` decoded straight into its shared-memory buffer: collated already."""

    batch: tuple


def load_batch(dataset, refs: list[SampleRef]):
    """A dataset's ``__getitems__`` (the DataLoader fetches a whole batch through it). In a loader worker,
    with a decoding transform that can write into a tensor (``batch_slots``), each image is decoded
    straight into its slot of the batch's shared-memory buffer (:func:`shared_batch_buffers`): no per-image
    tensor, no stacking copy (~30 µs per 224 px image). Otherwise the samples one by one, collated by
    :func:`collate` as before. Seeding, bad samples and order are per sample either way."""
    tf = dataset.transform
    if get_worker_info() is None or not getattr(tf, "batch_slots", False) or tf.size != dataset.image_size:
        return [dataset.load(r) for r in refs]
    images, labels, weights = shared_batch_buffers(len(refs), (3, tf.size, tf.size), torch.uint8)
    lab, w, bad = [], [], []
    for k, ref in enumerate(refs):
        _, label, weight, path = dataset.load(ref, images[k])
        lab.append(label)
        w.append(weight)
        if path:
            bad.append(path)
    # one copy each: assigning tensor elements one by one costs ~25 µs per element
    labels.copy_(torch.tensor(lab, dtype=torch.long))
    weights.copy_(torch.tensor(w, dtype=torch.float32))
    return FilledBatch((images, labels, weights, bad))


def collate(batch):
    """Stack a batch, keeping the weights and the paths of files that failed to decode."""
    if isinstance(batch, FilledBatch):
        return batch.batch
    imgs, labels, weights, bad = zip(*batch, strict=True)
    bad = [b for b in bad if b]
    if get_worker_info() is not None:
        return (*shared_batch(imgs, labels, weights), bad)
    return (
        torch.stack(imgs),
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(weights, dtype=torch.float32),
        bad,
    )


def shared_batch_buffers(
    n: int, shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, weights) of an ``n``-sample batch, as views of ONE shared-memory buffer.

    Every tensor leaving a loader worker must be in shared memory, and each storage gets its own segment
    and file-descriptor hand-over to the main process; one buffer for the batch, written in place (as
    torch's default_collate stacks into shared memory) instead of stacked and then copied there, measured
    ~45 µs per image less in a worker than three separate tensors.
    """
    img_bytes = n * math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    lab_at = -(-img_bytes // 8) * 8  # int64 views need an 8-byte aligned offset
    flat = shared_bytes(lab_at + 12 * n)
    images = flat[:img_bytes].view(dtype).view(n, *shape)
    labels = flat[lab_at : lab_at + 8 * n].view(torch.long)
    weights = flat[lab_at + 8 * n : lab_at + 12 * n].view(torch.float32)
    return images, labels, weights


def shared_batch(imgs, labels, weights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack samples into :func:`shared_batch_buffers`."""
    images, lab, w = shared_batch_buffers(len(imgs), tuple(imgs[0].shape), imgs[0].dtype)
    torch.stack(imgs, out=images)
    lab.copy_(torch.tensor(labels, dtype=torch.long))
    w.copy_(torch.tensor(weights, dtype=torch.float32))
    return images, lab, w
