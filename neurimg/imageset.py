"""A folder of images held on the host as integers, for training sets of any size.

`ImageSet` keeps every pixel of every image in one flat array `store` of shape
(total_pixels, 3): uint8 when every source has 8 bits per channel, uint16 when any has 16
(8-bit values are then scaled by 257, exactly). Image k occupies rows
`offsets[k] : offsets[k + 1]`, row-major, of size `sizes[k]` = (width, height). Host memory is
therefore the dataset's pixel bytes plus 24 bytes per image, not the 4x of float32, and device
memory holds only the batches that `neurimg.sampler` draws from it.

Colours are what `neurimg.data.decode_image` returns (alpha composited onto the background,
grayscale repeated), rounded to the storage's integer steps: exact for opaque 8-bit and 16-bit
sources; within half a step (0.5/255) where an 8-bit alpha channel was composited.

`load_image_set` decodes a large folder on several processes and reports progress through a
callback.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

import neurimg.data
from neurimg.data import (
    _is_png16,
    decode_with_depth,
    input_notes,
    list_image_files,
    read_bytes,
    unique_names,
)
from neurimg.errors import NeurimgError

Progress = Callable[[str, int, int], None]  # (phase, done, total)

# Files handed to a worker at a time: large enough that scheduling costs nothing, small enough
# that the progress bar moves.
_TASK_FILES = 128


@dataclass
class ImageSet:
    names: list[str]  # output names, unique within the run
    sources: list[str]  # where each image was read from ('-' for stdin)
    sizes: np.ndarray  # (N, 2) int64: (width, height)
    offsets: np.ndarray  # (N + 1,) int64: first row of each image in `store`
    store: np.ndarray  # (total_pixels, 3) uint8 | uint16
    first_id: int = 0  # index of image 0 in the whole run (a process's share starts here)
    notes: list[str] = field(default_factory=list)  # `input_notes` of the files

    def __len__(self) -> int:
        return len(self.names)

    @property
    def scale(self) -> float:
        """Integer value of colour 1.0 in `store`."""
        return 65535.0 if self.store.dtype == np.uint16 else 255.0

    @property
    def counts(self) -> np.ndarray:
        """(N,) pixels per image."""
        return np.diff(self.offsets)

    @property
    def nbytes(self) -> int:
        return int(self.store.nbytes + self.sizes.nbytes + self.offsets.nbytes)

    def image(self, k: int) -> np.ndarray:
        """Image k as (H, W, 3) float32 in [0, 1]."""
        w, h = (int(v) for v in self.sizes[k])
        rows = self.store[self.offsets[k] : self.offsets[k + 1]]
        return (rows.astype(np.float32) / np.float32(self.scale)).reshape(h, w, 3)

    @staticmethod
    def from_arrays(names: list[str], sources: list[str], images: list[np.ndarray], bits: int = 8) -> "ImageSet":
        """Quantize float (H, W, 3) images in [0, 1] into a set (`bits` = 8 or 16)."""
        if not images:
            raise NeurimgError("no images given")
        sizes = np.array([(im.shape[1], im.shape[0]) for im in images], np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes[:, 0] * sizes[:, 1])]).astype(np.int64)
        dtype = np.uint16 if bits == 16 else np.uint8
        store = np.empty((int(offsets[-1]), 3), dtype)
        for k, im in enumerate(images):
            store[offsets[k] : offsets[k + 1]] = quantize(im.reshape(-1, 3), dtype)
        return ImageSet(list(names), list(sources), sizes, offsets, store)


def quantize(rgb: np.ndarray, dtype) -> np.ndarray:
    scale = 65535.0 if np.dtype(dtype) == np.uint16 else 255.0
    return np.rint(np.clip(rgb, 0.0, 1.0) * scale).astype(dtype)


def default_workers() -> int:
    """Decoding processes: one per available core, at most 32."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(32, n))


def decode_stored(data: bytes, what: str, background=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, int, int]:
    """Decode image bytes into ((H, W, 3) uint8 or uint16 RGB, bits per channel: 8 or 16,
    frames in the source: see `neurimg.data.decode_with_depth`).

    Opaque 8-bit RGB takes a direct path (no float round trip); everything else goes through
    `decode_with_depth` and is rounded back to its bit depth."""
    PILImage = neurimg.data.pil()

    if not _is_png16(data):
        try:
            with PILImage.open(io.BytesIO(data)) as im:
                # The module's attribute, not a copy taken at import: the cap may be changed.
                if im.mode == "RGB" and im.width * im.height <= neurimg.data.MAX_IMAGE_PIXELS:
                    arr = np.asarray(im)
                    if arr.ndim == 3 and arr.dtype == np.uint8 and arr.shape[0] and arr.shape[1] and getattr(im, "n_frames", 1) == 1:
                        return arr, 8, 1
        except Exception:
            pass  # the general path below reports the error properly
    rgb, bits, frames = decode_with_depth(data, what, background)
    return quantize(rgb, np.uint16 if bits == 16 else np.uint8), bits, frames


def _decode_files(files: list[str], background) -> tuple:
    """Worker: decode a list of files. Returns ("ok", sizes (n, 2), bits (n,), rows, notes) with
    rows all their pixels concatenated (uint16 if any is 16-bit) and notes the files'
    `input_notes`, or ("error", message)."""
    try:
        arrs, bits, notes = [], [], []
        for f in files:
            data, what = read_bytes(f)
            a, b, frames = decode_stored(data, what, background)
            arrs.append(a)
            bits.append(b)
            notes += input_notes(what, b, frames)
    except NeurimgError as e:
        return ("error", str(e))
    sizes = np.array([(a.shape[1], a.shape[0]) for a in arrs], np.int64).reshape(-1, 2)
    wide = max(bits) == 16
    rows = np.concatenate([(a.astype(np.uint16) * 257 if wide and b == 8 else a).reshape(-1, 3) for a, b in zip(arrs, bits)])
    return ("ok", sizes, np.array(bits, np.int64), rows, notes)


class _Accumulator:
    """Rows appended into one growing array. It grows (with `ndarray.resize`, i.e. `realloc`,
    which remaps large blocks rather than copying them) to the size the files read so far
    predict for all `files`, plus 2%, so memory stays near the final size, not twice it."""

    def __init__(self, files: int):
        self.files = files
        self.store = np.empty((1 << 16, 3), np.uint8)
        self.rows = 0
        self.images = 0
        self.sizes: list[np.ndarray] = []

    def add(self, sizes: np.ndarray, bits: np.ndarray, rows: np.ndarray) -> None:
        if rows.dtype == np.uint16 and self.store.dtype == np.uint8:  # first 16-bit image: widen
            wide = self.store[: self.rows].astype(np.uint16) * 257
            self.store = np.concatenate([wide, np.empty((max(len(wide), 1 << 16), 3), np.uint16)])
        elif rows.dtype == np.uint8 and self.store.dtype == np.uint16:
            rows = rows.astype(np.uint16) * 257
        need = self.rows + len(rows)
        if need > len(self.store):
            done = self.images + len(sizes)
            predicted = int(need / done * self.files * 1.02) + 1
            self.store.resize((max(need, predicted, len(self.store) * 5 // 4), 3), refcheck=False)
        self.store[self.rows : need] = rows
        self.rows = need
        self.sizes.append(sizes)
        self.images += len(sizes)

    def finish(self):
        self.store.resize((self.rows, 3), refcheck=False)
        sizes = np.concatenate(self.sizes)
        offsets = np.concatenate([[0], np.cumsum(sizes[:, 0] * sizes[:, 1])]).astype(np.int64)
        return sizes, offsets, self.store


# Below this many files a folder is decoded in this process (starting workers costs ~0.5 s).
_POOL_MIN_FILES = 2000


def load_image_set(
    paths: list[str],
    background=(1.0, 1.0, 1.0),
    *,
    workers: int | None = None,
    progress: Optional[Progress] = None,
    share: tuple[int, int] = (0, 1),
    files: list[str] | None = None,
) -> ImageSet:
    """Read the images named by `paths` (folders expanded, see `neurimg.data.list_image_files`;
    `files` passes that list when the caller already has it).

    `share` = (index, count) keeps only the index-th of `count` contiguous, near-equal parts of
    the sorted file list (one per process of a multi-host run); names are those of the whole
    list, and `first_id` says where the share starts.

    Large folders are decoded by `workers` processes (PNG decoding of small images is mostly
    Python-level work, so threads would not run in parallel), `_TASK_FILES` files per task.
    Each task returns its pixels as one array, appended to the store (see `_Accumulator`), so
    memory peaks near the dataset's bytes plus the tasks in flight.
    """
    files = list_image_files(paths) if files is None else files
    names = unique_names(files)
    index, count = share
    lo, hi = len(files) * index // count, len(files) * (index + 1) // count
    files, names = files[lo:hi], names[lo:hi]
    if not files:
        raise NeurimgError(f"process {index} of {count} has no images (only {len(names)} in all)")
    n = len(files)
    workers = default_workers() if workers is None else max(1, workers)
    tasks = [files[i : i + _TASK_FILES] for i in range(0, n, _TASK_FILES)]
    acc = _Accumulator(n)  # replaced if the pool fails
    notes: list[str] = []
    if progress:
        progress("decoding", 0, n)

    def collect(res):
        if res[0] == "error":
            raise NeurimgError(res[1])
        acc.add(res[1], res[2], res[3])
        notes.extend(res[4])
        if progress:
            progress("decoding", acc.images, n)

    if workers == 1 or n < _POOL_MIN_FILES or "-" in files:
        for t in tasks:
            collect(_decode_files(t, background))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # "spawn": forking a process that has started JAX's threads is unsafe.
        from concurrent.futures.process import BrokenProcessPool

        try:
            # "spawn": forking a process that has started JAX's threads is unsafe.
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                try:
                    for res in pool.map(_decode_files, tasks, [background] * len(tasks)):
                        collect(res)
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
        except BrokenProcessPool:  # workers could not start (e.g. `python -` as main): decode here
            acc, notes[:] = _Accumulator(n), []
            for t in tasks:
                collect(_decode_files(t, background))
    sizes, offsets, store = acc.finish()
    return ImageSet(names, files, sizes, offsets, store, first_id=lo, notes=notes)
