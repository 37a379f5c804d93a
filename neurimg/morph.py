"""Latent morphs: the field rendered along the straight line between two stored images'
latents, written as an animated GIF or a video (through imageio; MP4 needs imageio-ffmpeg).

Frame k of n is the latent mix at t_k = k / (n - 1) (`fieldnet.mix_latents`), so the first
frame is exactly image A's latent and the last exactly B's. With `loop`, the frames then run
back (n-2 .. 1), so a repeating animation goes A -> B -> A without a repeated frame.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from neurimg.errors import NeurimgError

FORMATS = (".gif", ".mp4")
MAX_FRAMES = 2000


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


def encode(frames: list[np.ndarray], fmt: str, fps: float) -> bytes:
    """(H, W, 3) uint8 frames -> the bytes of a GIF (repeating forever) or an H.264 MP4. MP4
    frames of odd width or height get one more column/row (a copy of the last): H.264's 4:2:0
    colour needs even sizes."""
    arr = np.stack(frames)
    if fmt == ".gif":
        import imageio.v3 as iio

        return iio.imwrite("<bytes>", arr, extension=".gif", duration=1000.0 / fps, loop=0)
    import imageio.v2 as iio2  # its FFMPEG plugin runs imageio-ffmpeg's binary (`animation_format` checked)

    h, w = arr.shape[1:3]
    arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    fd, tmp = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # imageio-ffmpeg starts ffmpeg by fork + exec; JAX warns about any fork of its
            # threaded process, but the exec'd child runs none of its code.
            warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
            with iio2.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=1,
                                 ffmpeg_log_level="error", pixelformat="yuv420p") as wr:
                for f in arr:
                    wr.append_data(f)
        return Path(tmp).read_bytes()
    finally:
        os.unlink(tmp)
