"""Reading images and folders; writing PNGs atomically; '-' for stdin/stdout.

Images are returned as float32 RGB arrays of shape (H, W, 3) with values in [0, 1]:
8-bit values are divided by 255 and 16-bit ones by 65535; grayscale is repeated into three
channels; alpha is composited onto `background` (white by default).
"""

from __future__ import annotations

import io
import os
import secrets
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neurimg.errors import NeurimgError, missing

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Refuse decoding bombs (e.g. a 100000 x 100000 PNG). Read at call time, so tests can lower it.
MAX_IMAGE_PIXELS = 1 << 28


@dataclass
class Image:
    name: str  # file name used for outputs (unique within a run)
    source: str  # where it was read from ('-' for stdin)
    pixels: np.ndarray  # (H, W, 3) float32 in [0, 1]

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def to_rgb(arr: np.ndarray, background=(1.0, 1.0, 1.0), what: str = "image") -> np.ndarray:
    """Convert a decoded array (H,W), (H,W,1..4) of uint8/uint16/bool/float to float32 RGB."""
    a = np.asarray(arr)
    if a.dtype == bool:
        a = a.astype(np.float32)
    elif a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    elif a.dtype in (np.int32, np.int64, np.uint32):  # some 16-bit / 32-bit integer PNG modes
        a = a.astype(np.float64) / (65535.0 if a.max(initial=0) > 255 else 255.0)
        a = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
    else:
        raise NeurimgError(f"{what}: unsupported pixel type {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise NeurimgError(f"{what}: unsupported image shape {tuple(arr.shape)}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise NeurimgError(f"{what}: image is empty")
    c = a.shape[2]
    if c in (2, 4):
        color, alpha = a[:, :, : c - 1], a[:, :, c - 1 :]
    else:
        color, alpha = a, None
    if color.shape[2] == 1:
        color = np.repeat(color, 3, axis=2)
    if alpha is not None:
        bg = np.asarray(background, np.float32).reshape(1, 1, 3)
        color = color * alpha + bg * (1.0 - alpha)
    out = np.clip(color, 0.0, 1.0).astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise NeurimgError(f"{what}: image contains NaN or infinite values")
    return np.ascontiguousarray(out)


def _is_png16(data: bytes) -> bool:
    # PNG signature, then the IHDR chunk: bit depth is byte 24.
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 25 and data[24] == 16


def pil():
    """Pillow's Image module with its own decompression-bomb limit off: neurimg has one cap,
    MAX_IMAGE_PIXELS, checked on the header before any pixel is decoded (`_check_pixels`), so
    Pillow's warning (two lines with a site-packages path) never reaches the user and its lower
    limit never refuses an image the documented cap allows."""
    from PIL import Image as PILImage

    PILImage.MAX_IMAGE_PIXELS = None
    return PILImage


def _check_pixels(width: int, height: int, what: str) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise NeurimgError(f"{what}: image of {width}x{height} pixels is too large")


def _decode_png16(data: bytes, what: str, background) -> np.ndarray:
    """16-bit PNGs at full precision (Pillow keeps only the high byte of 16-bit RGB)."""
    import png  # pypng

    # pypng has no size cap: check the IHDR's width and height (big-endian) before decoding.
    _check_pixels(int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), what)
    try:
        w, h, rows, info = png.Reader(bytes=data).asDirect()
        arr = np.vstack([np.asarray(r, np.uint16) for r in rows])
    except Exception as e:
        raise NeurimgError(f"{what}: not a readable image ({_short(e)})") from e
    planes = int(info["planes"])
    if arr.size != w * h * planes:
        raise NeurimgError(f"{what}: not a readable image (truncated data)")
    return to_rgb(arr.reshape(h, w, planes), background, what)


def decode_image(data: bytes, what: str, background=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Decode image bytes into (H, W, 3) float32 RGB; `what` names the file in errors."""
    return decode_with_depth(data, what, background)[0]


def input_notes(name: str, bits: int, frames: int) -> list[str]:
    """What the user should hear about how an input was read: an animation's first frame only;
    a 16-bit image read at full precision, while PNG outputs are 8-bit."""
    notes = []
    if frames > 1:
        notes.append(f"{name}: an animation of {frames} frames; only the first is used")
    if bits == 16:
        notes.append(f"{name}: 16-bit, read at full precision; the PNGs written are 8-bit")
    return notes


def decode_with_depth(data: bytes, what: str, background=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, int, int]:
    """Decode image bytes: ((H, W, 3) float32 RGB, bits per channel of the source: 8 or 16,
    frames in the source: more than 1 for an animation, of which the first is decoded)."""
    PILImage = pil()

    if _is_png16(data):
        return _decode_png16(data, what, background), 16, 1

    try:
        with PILImage.open(io.BytesIO(data)) as im:
            _check_pixels(im.width, im.height, what)
            frames = int(getattr(im, "n_frames", 1) or 1)
            im.load()
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            elif im.mode == "LA" or im.mode == "PA":
                im = im.convert("LA")
            elif im.mode in ("I;16", "I;16B", "I;16L"):
                arr = np.array(im, dtype=np.uint16)
                return to_rgb(arr, background, what), 16, frames
            elif im.mode == "I":
                arr = np.array(im).astype(np.int64)
                return to_rgb(np.clip(arr, 0, 65535).astype(np.uint16), background, what), 16, frames
            arr = np.array(im)
    except NeurimgError:
        raise
    except Exception as e:  # PIL raises many types for damaged files
        raise NeurimgError(f"{what}: not a readable image ({_short(e)})") from e
    return to_rgb(arr, background, what), 8, frames


def _short(e: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):  # its text names a BytesIO object, not the file
        return "not a format Pillow can decode"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:200]


def read_bytes(path: str | os.PathLike) -> tuple[bytes, str]:
    """The bytes of one file ('-' reads stdin) and the name to use for it in errors."""
    if str(path) == "-":
        data = sys.stdin.buffer.read()
        if not data:
            raise NeurimgError("stdin: no image data")
        return data, "stdin"
    p = Path(path)
    if not p.exists():
        raise missing(p)
    if p.is_dir():
        raise NeurimgError(f"{p}: is a folder, expected an image file")
    _check_regular(p)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise NeurimgError(f"{p}: cannot read ({e.strerror or e})") from e
    if not data:
        raise NeurimgError(f"{p}: empty file, not an image")
    return data, str(p)


def _check_regular(p: Path) -> None:
    # Checked with stat, before any open(): opening a FIFO blocks and /dev/zero never ends.
    if not p.is_file():
        raise NeurimgError(f"{p}: is not a regular file")


def read_image(path: str | os.PathLike, background=(1.0, 1.0, 1.0), notes: list[str] | None = None) -> np.ndarray:
    """Read one image file ('-' reads stdin) into (H, W, 3) float32 RGB; `notes` (if given)
    gets `input_notes` about it."""
    data, what = read_bytes(path)
    rgb, bits, frames = decode_with_depth(data, what, background)
    if notes is not None:
        notes += input_notes(what, bits, frames)
    return rgb


def list_image_files(paths: list[str]) -> list[str]:
    """Expand folders (top level, image suffixes, hidden files skipped, sorted) and keep files.

    Files named explicitly are kept whatever their suffix (decoding reports non-images)."""
    if not paths:
        raise NeurimgError("no input given: pass a folder or image files")
    files: list[str] = []
    for raw in paths:
        if raw == "-":
            files.append("-")
            continue
        p = Path(raw)
        if not p.exists():
            raise missing(p)
        if p.is_dir():
            try:
                entries = sorted(p.iterdir(), key=lambda q: q.name)
            except OSError as e:
                raise NeurimgError(f"{p}: cannot list folder ({e.strerror or e})") from e
            found = [
                str(q)
                for q in entries
                if q.is_file() and not q.name.startswith(".") and q.suffix.lower() in IMAGE_SUFFIXES
            ]
            if not found:
                raise NeurimgError(f"{p}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        else:
            _check_regular(p)
            files.append(str(p))
    if files.count("-") > 1:
        raise NeurimgError("'-' (stdin) can be given only once")
    return files


def unique_names(sources: list[str]) -> list[str]:
    """Output names: the source file name, made unique by a numeric suffix where needed."""
    names, seen = [], set()
    for s in sources:
        # A backslash is a path separator elsewhere: checkpoints refuse names holding one.
        base = "stdin.png" if s == "-" else Path(s).name.replace("\\", "_")
        name, stem, suffix, n = base, Path(base).stem, Path(base).suffix, 1
        while name in seen:
            name = f"{stem}-{n}{suffix}"
            n += 1
        seen.add(name)
        names.append(name)
    return names


def load_images(paths: list[str], background=(1.0, 1.0, 1.0), notes: list[str] | None = None) -> list[Image]:
    """Read every image named by `paths` (folders expanded); `notes` (if given) gets
    `input_notes` about them."""
    files = list_image_files(paths)
    names = unique_names(files)
    return [Image(n, f, read_image(f, background, notes)) for n, f in zip(names, files)]


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """Float RGB (any range) -> uint8, clipped and rounded."""
    return (np.clip(np.asarray(rgb, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_png(rgb: np.ndarray) -> bytes:
    import imageio.v3 as iio

    arr = rgb if rgb.dtype == np.uint8 else to_uint8(rgb)
    return iio.imwrite("<bytes>", arr, extension=".png")


@contextmanager
def atomic_file(path: str | os.PathLike):
    """A temporary path in `path`'s folder (same suffix, so a writer can tell the format) that
    becomes `path` by a rename when the block ends without error, and is removed otherwise: for
    writers that need a file name, not bytes (e.g. a video encoder fed frame by frame). The
    file has mode 0o666 less the umask, as open(path, "wb") gives (mkstemp would force 0o600,
    which shared storage cannot use); O_EXCL never follows a link planted at the temporary name."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.stem}.{secrets.token_hex(8)}.tmp{p.suffix}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and a rename."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an RGB image (float in [0,1] or uint8) as PNG; '-' writes to stdout."""
    write_output(path, encode_png(rgb))


# Exit code of a write to a pipe whose reader has gone: what a tool killed by SIGPIPE gives.
BROKEN_PIPE_EXIT = 141


def write_stdout(data: bytes | str) -> None:
    """All of `data` (bytes, or text such as a JSON summary) to stdout, or a one-line error: a
    reader that went away (`| head`) is exit code BROKEN_PIPE_EXIT; stdout closed (`>&-`) or
    failing (`> /dev/full`) is 1."""
    out = sys.stdout if isinstance(data, str) else getattr(sys.stdout, "buffer", None)
    if out is None:
        raise NeurimgError("stdout is closed: nothing could be written to it", exit_code=1)
    try:
        out.write(data)
        out.flush()
    except BrokenPipeError:
        _drop_stdout()
        raise NeurimgError(f"stdout: the reader went away after part of the {len(data)} bytes (broken pipe)",
                           exit_code=BROKEN_PIPE_EXIT) from None
    except (OSError, ValueError) as e:  # ValueError: stdout was closed under us
        _drop_stdout()
        raise NeurimgError(f"stdout: cannot write ({getattr(e, 'strerror', None) or e})", exit_code=1) from None


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's flush at exit reports nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def write_output(path: str | os.PathLike, data: bytes) -> None:
    """Write a command's output file atomically; '-' writes to stdout (`write_stdout`). A file
    that cannot be written is exit code 1 with the path and the reason (a run-time failure, as
    for a checkpoint)."""
    if str(path) == "-":
        write_stdout(data)
        return
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise NeurimgError(f"{path}: cannot write ({e.strerror or e})", exit_code=1) from e


def output_names(names: list[str]) -> list[str]:
    """The PNG file name of each image in an output folder, never two alike: STEM.png, STEM being
    the image's name less its suffix; where two names share a stem (`logo.png`, `logo.jpg`),
    the one already a .png keeps STEM.png (else the first) and the others keep their suffix
    (`logo.jpg.png`); then `-N` where even that repeats. Compared without case, so the files stay
    distinct on case-insensitive file systems (macOS, Windows) too."""
    stems = [Path(n).stem for n in names]
    count: dict[str, int] = {}
    for s in stems:
        count[s.casefold()] = count.get(s.casefold(), 0) + 1
    # The image that keeps STEM.png when its stem is shared: a .png name, else the first.
    keeps: dict[str, int] = {}
    for i, n in enumerate(names):
        k = stems[i].casefold()
        if count[k] > 1 and (k not in keeps or (Path(n).suffix.lower() == ".png" and Path(names[keeps[k]]).suffix.lower() != ".png")):
            keeps[k] = i
    wanted = [f"{s}.png" if count[s.casefold()] == 1 or keeps[s.casefold()] == i else f"{names[i]}.png" for i, s in enumerate(stems)]
    out: list[str] = []
    taken = {w.casefold() for w in wanted}
    used: set[str] = set()
    for w in wanted:
        name, n = w, 0
        while name.casefold() in used or (n and name.casefold() in taken):  # -N: one no image wants
            n += 1
            name = f"{Path(w).stem}-{n}.png"
        used.add(name.casefold())
        out.append(name)
    return out


def output_paths(names: list[str], output: str | None, *, default_file: str | None, default_folder: str | os.PathLike) -> list[str]:
    """Where a command writes its images: the one rule of every command that writes them.

    - `-o -`: stdout, for exactly one image;
    - `-o FILE.png` (a .png name that is not an existing folder): that file, for exactly one image;
    - `-o DIR` (anything else): one PNG per image in DIR, named by `output_names` (STEM.png,
      distinct even where two sources share a stem);
    - no `-o`: `default_file` when there is one image and the command has a default file name,
      otherwise `default_folder` as for `-o DIR`.
    """
    n = len(names)
    if output == "-":
        if n != 1:
            raise NeurimgError(f"-o - (stdout) takes one image, but there are {n}; give a folder")
        return ["-"]
    if output is not None and Path(output).suffix.lower() == ".png" and not Path(output).is_dir():
        if n != 1:
            raise NeurimgError(f"-o {output} is a file, but there are {n} images; give a folder")
        return [output]
    if output is None and n == 1 and default_file is not None:
        return [default_file]
    folder = Path(output) if output is not None else Path(default_folder)
    if folder.exists() and not folder.is_dir():
        raise NeurimgError(f"-o {folder}: exists and is not a folder")
    return [str(folder / name) for name in output_names(names)]
