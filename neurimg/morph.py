"""Latent morphs: the field rendered along the straight line between two stored images'
latents, written as an animated GIF or a video (through imageio; MP4 needs imageio-ffmpeg).

Frame k of n is the latent mix at t_k = k / (n - 1) (`fieldnet.mix_latents`), so the first
frame is exactly image A's latent and the last exactly B's. With `loop`, the frames then run
back (n-2 .. 1), so a repeating animation goes A -> B -> A without a repeated frame.

Memory: a GIF is encoded in memory, so its frames together are bounded (`check_memory`,
refused before rendering); an MP4 is streamed to the encoder a frame at a time.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np

from neurimg.errors import NeurimgError

FORMATS = (".gif", ".mp4")
MAX_FRAMES = 2000
# All the pixels a GIF may hold over its frames (see `check_memory`): 30 frames of 2048x2048 fit.
MAX_GIF_PIXELS = 1 << 27


def frame_ts(frames: int) -> list[float]:
    """The mixing weight of each of `frames` frames from A to B (see the module docstring)."""
    if not isinstance(frames, int) or not 2 <= frames <= MAX_FRAMES:
        raise NeurimgError(f"--frames must be an integer from 2 to {MAX_FRAMES}, got {frames}")
    return [k / (frames - 1) for k in range(frames)]


def looped(frames: list, loop: bool) -> list:
    """With `loop`, the frames then back again (n-2 .. 1): A -> B -> A, none repeated."""
    return frames + frames[-2:0:-1] if loop else frames


def animation_format(path: str) -> str:
    """'.gif' or '.mp4' from the output's suffix ('-' is GIF); MP4 only if it can be written."""
    f = ".gif" if path == "-" else Path(path).suffix.lower()
    if f not in FORMATS:
        raise NeurimgError(f"{path}: cannot tell the animation format; use a .gif or .mp4 name")
    if f == ".mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:  # an optional dependency
        raise NeurimgError('writing MP4 needs imageio-ffmpeg (pip install "neurimg[video]"); .gif needs nothing more')
    return f


def check_memory(fmt: str, shown: int, width: int, height: int) -> None:
    """Refuse, before anything is rendered, a GIF whose frames cannot be held: Pillow's GIF
    writer keeps every frame until the file is done, so a GIF may hold at most
    MAX_GIF_PIXELS pixels over all its `shown` frames (about 8 bytes each while encoding). An
    MP4 is written frame by frame: only one frame at a time is held."""
    total = shown * width * height
    if fmt == ".gif" and total > MAX_GIF_PIXELS:
        raise NeurimgError(
            f"a GIF of {shown} frames of {width}x{height} holds {total / 1e6:.0f} megapixels in all, more than the "
            f"{MAX_GIF_PIXELS / 1e6:.0f} a GIF may (it is encoded in memory): use fewer --frames, a smaller --size, "
            "or an .mp4 name (written frame by frame)")


def order(frames: int, loop: bool) -> list[int]:
    """The index (into `frame_ts`) of each frame shown: 0 .. n-1, and with `loop` n-2 .. 1."""
    return looped(list(range(frames)), loop)


def write(path: str, render, frames: int, fmt: str, fps: float, loop: bool, progress=None) -> int:
    """Render and write an animation of `frames` mixing weights (`frame_ts`) to `path` ('-':
    stdout, GIF only); returns the bytes written. `render(t)` gives one (H, W, 3) uint8 frame;
    `progress(phase, done, total)` hears of each frame shown.

    A GIF's frames go into one array, each rendered once (`check_memory` bounds it), then it is
    encoded. An MP4's frames go to the encoder as they are rendered, into a temporary file
    renamed into place at the end; with `loop`, the frames are kept for the way back only if a
    GIF could hold them, else rendered again."""
    from neurimg.data import atomic_file, write_output

    ts = frame_ts(frames)
    shown = order(frames, loop)

    def tick(i: int) -> None:
        if progress:
            progress("morph", i + 1, len(shown))

    if fmt == ".gif":
        arr, first = None, {}
        for i, k in enumerate(shown):
            if k in first:
                arr[i] = arr[first[k]]
            else:
                f = render(ts[k])
                if arr is None:
                    arr = np.empty((len(shown), *f.shape), np.uint8)
                arr[i], first[k] = f, i
            tick(i)
        data = encode_gif(arr, fps)
        write_output(path, data)
        return len(data)

    import imageio.v2 as iio2  # its FFMPEG plugin runs imageio-ffmpeg's binary (`animation_format` checked)

    kept: dict[int, np.ndarray] | None = None
    try:
        with atomic_file(path) as tmp, warnings.catch_warnings():
            # imageio-ffmpeg starts ffmpeg by fork + exec; JAX warns about any fork of its
            # threaded process, but the exec'd child runs none of its code.
            warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
            with iio2.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                 ffmpeg_log_level="error", pixelformat="yuv420p") as wr:
                for i, k in enumerate(shown):
                    f = kept[k] if kept is not None and k in kept else render(ts[k])
                    if kept is None and loop and frames * f.shape[0] * f.shape[1] <= MAX_GIF_PIXELS:
                        kept = {}
                    if kept is not None:
                        kept[k] = f
                    wr.append_data(even(f))
                    tick(i)
            size = os.path.getsize(tmp)
    except OSError as e:
        raise NeurimgError(f"{path}: cannot write ({e.strerror or e})", exit_code=1) from e
    return size


def even(frame: np.ndarray) -> np.ndarray:
    """A frame of odd width or height with one more column/row (a copy of the last): H.264's
    4:2:0 colour needs even sizes."""
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge") if h % 2 or w % 2 else frame


def encode_gif(frames: np.ndarray, fps: float) -> bytes:
    """(N, H, W, 3) uint8 frames -> the bytes of a GIF that repeats forever."""
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", frames, extension=".gif", duration=1000.0 / fps, loop=0)
