"""The `neurimg` command line: thin Typer commands over the library.

Errors: a `NeurimgError` (or a usage error) becomes one line on stderr, `neurimg: error: ...`,
and exit code 2 (1 for run-time failures such as divergence); Ctrl-C during training saves a
checkpoint and exits 130. Set NEURIMG_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from neurimg.config import (AREA_SUPERSAMPLE, AREA_WIDTH, GRID_FROM_IMAGES, WIDTH, BlendConfig, Config, GanConfig, ModelConfig, TrainConfig,
                            UpsampleConfig)
from neurimg.errors import NeurimgError, count

app = typer.Typer(
    name="neurimg",
    help="Images as neural fields: fit SIREN networks to images, render them at any size.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts hold literal "[default: ...]": not Rich markup
    context_settings={"help_option_names": ["-h", "--help"]},
)

def _print_version(value: bool) -> None:
    if value:
        from neurimg import __version__

        print(f"neurimg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    pass


# Help texts read their defaults from the config dataclasses (neurimg.config), never a copy.
_M, _T, _B, _U, _G = ModelConfig(), TrainConfig(), BlendConfig(), UpsampleConfig(), GanConfig()


def _dflt(v) -> str:
    """A default as help shows it: '[default: V]'."""
    if isinstance(v, tuple) and len(v) == 3 and all(isinstance(c, float) for c in v):
        v = next((k for k, c in _COLOURS.items() if c == v), ",".join(f"{c:g}" for c in v))
    elif isinstance(v, tuple):
        v = ",".join(str(x) for x in v) or "none"
    elif isinstance(v, float):
        v = f"{v:g}"
    return f"[default: {v}]"

def _examples(*lines: str) -> str:
    """A command's --help epilog: example command lines, kept as written ("\\b": Click does not
    rewrap the paragraph)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


EXAMPLES = {
    "fit": _examples("neurimg fit logos/ -o runs/logos", "neurimg fit photo.png -o runs/photo --steps 2000 --width 256",
                     "neurimg fit --resume -o runs/logos --steps 3000       # continue, to a new total"),
    "render": _examples("neurimg render runs/logos -o out/                     # every image, at its size",
                        "neurimg render runs/logos -i vite-icon.png --scale 8 -o vite@8x.png",
                        "neurimg render runs/logos -i 0 --region 16,16,48,48 --size 512x512 -o - > crop.png",
                        "neurimg render runs/logos --mix 0,1 --t 0.5 -o mid.png"),
    "morph": _examples("neurimg morph runs/logos vite-icon.png chromatic-icon.png -o morph.gif --loop",
                       "neurimg morph runs/logos 0 1 --frames 60 --size 512x512 -o morph.mp4"),
    "export": _examples("neurimg export runs/logos -o logos.onnx", "neurimg export runs/logos -i 0 -o one-logo.onnx"),
    "view": _examples("neurimg view runs/logos                               # opens the page in a browser",
                      "neurimg view runs/logos --html logos.html --no-open"),
    "blend": _examples("neurimg blend a.png b.png -o blend.png", "neurimg blend a.png b.png --mode mixed --solver exact -o -",
                       "neurimg blend a.png b.png --method gan --model runs/blender -o gan.png"),
    "blend-train": _examples("neurimg blend-train logos/ -o runs/blender", "neurimg blend-train --resume -o runs/blender"),
    "upsample": _examples("neurimg upsample --scale 4 logo.png                    # -> logo@4x.png",
                          "neurimg upsample --scale 2.5 photos/ -o big/", "cat in.png | neurimg upsample - --size 1024x768 > out.png",
                          "neurimg upsample --from runs/logos -i 0 --scale 8 -o vite@8x.png"),
}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or messages on stderr.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing run in --output (its checkpoint, logs, metrics and snapshots are removed first).")]
BackgroundOpt = Annotated[Optional[str], typer.Option(help="Colour that transparent pixels are composited onto: white, black, gray, #rrggbb or r,g,b. [default: white]", show_default=False)]


def _read_pair(a: str, b: str, background, quiet: bool):
    """blend's two inputs, (H, W, 3) float32 each, with what to say of how they were read."""
    from neurimg.data import read_image

    notes: list[str] = []
    pair = read_image(a, background, notes), read_image(b, background, notes)
    _say_notes(notes, quiet)
    return pair


def _say_notes(notes: list[str], quiet: bool) -> None:
    """How the inputs were read (`data.input_notes`), a few lines at most, on stderr."""
    from neurimg.errors import summarised
    from neurimg.progress import info

    for line in summarised(notes):
        info(line, quiet)


def _emit_json(obj) -> None:
    from neurimg.data import write_stdout

    write_stdout(json.dumps(obj) + "\n")


# --------------------------------------------------------------------------------------------
# option parsing helpers (pure; raise NeurimgError)

_COLOURS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5), "grey": (0.5, 0.5, 0.5)}


def parse_color(text: str) -> tuple[float, float, float]:
    """'white' | 'black' | 'gray' | '#rrggbb' | 'r,g,b' (floats in [0, 1])."""
    t = text.strip().lower()
    if t in _COLOURS:
        return _COLOURS[t]
    if t.startswith("#") and len(t) == 7:
        try:
            return tuple(int(t[i : i + 2], 16) / 255.0 for i in (1, 3, 5))  # type: ignore[return-value]
        except ValueError:
            pass
    parts = t.split(",")
    if len(parts) == 3:
        try:
            vals = tuple(float(p) for p in parts)
            if all(math.isfinite(v) and 0 <= v <= 1 for v in vals):
                return vals  # type: ignore[return-value]
        except ValueError:
            pass
    raise NeurimgError(f"--background must be white, black, gray, #rrggbb or r,g,b in [0, 1], got {text!r}")


def parse_batch_pixels(text: str) -> int:
    if text.strip().lower() in ("all", "full"):
        return 0
    try:
        v = int(text)
    except ValueError:
        raise NeurimgError(f"--batch-pixels must be a positive integer or 'all', got {text!r}") from None
    if v <= 0:
        raise NeurimgError(f"--batch-pixels must be a positive integer or 'all', got {text!r}")
    return v


def parse_batch_images(text: str) -> int:
    if text.strip().lower() in ("auto", "0"):
        return 0
    if text.strip().lower() == "all":
        return -1
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v <= 0:
        raise NeurimgError(f"--batch-images must be a positive integer, 'all' or 'auto', got {text!r}")
    return v


def parse_steps_list(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        vals = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise NeurimgError(f"--snapshots must be comma-separated steps like 1,500,1000, got {text!r}") from None
    if any(v < 1 for v in vals):
        raise NeurimgError(f"--snapshots steps must be >= 1, got {text!r}")
    return vals


def parse_out_size(scale: Optional[float], size: Optional[str], required: bool = False):
    """(scale, (W, H) or None) from --scale / --size: at most one of them (exactly one if
    `required`)."""
    from neurimg.coords import parse_size

    parse_scale(scale)
    sz = parse_size(size) if size is not None else None
    if (scale is not None and sz is not None) or (required and scale is None and sz is None):
        raise NeurimgError("give --scale S or --size WxH (one of them)" + (", not both" if sz is not None else ""))
    return scale, sz


def parse_scale(value: Optional[float]) -> Optional[float]:
    if value is None:
        return None
    if not math.isfinite(value) or value <= 0:
        raise NeurimgError(f"--scale must be a positive finite number, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# fit


@app.command(epilog=EXAMPLES["fit"])
def fit(
    paths: Annotated[Optional[list[str]], typer.Argument(help="Image files and/or folders of images ('-' reads one image from stdin). May be omitted with --resume.", show_default=False)] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Run folder to create (or continue with --resume). [default: runs/fit-DATE-TIME]", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps in total. With --resume, a new total: the learning rate then decays from where it stopped to its final value at the new total (it never jumps up). [default: auto: (900 + 25 log2(pixels per image / 4096)) x max(1, sqrt(pixels in all / 2^18)): 900 for 48 logos of 64x64 (twice that fitted as areas: 1800), 1000 for a 256x256 photo, 2200 for a megapixel; with a latent grid, at least enough for 20 views of each pixel, up to 3000]", show_default=False)] = None,
    width: Annotated[Optional[int], typer.Option(help=f"Units per sine layer. [default: auto: {AREA_WIDTH} for an area fit with a latent grid, else {WIDTH}]", show_default=False)] = None,
    hidden_layers: Annotated[Optional[int], typer.Option(help=f"Hidden (width x width) sine layers, after the first. {_dflt(_M.hidden_layers)}", show_default=False)] = None,
    latent_dim: Annotated[Optional[int], typer.Option(help="Size of each image's latent code. [default: auto: 128 x (images / 64), within 128-512: 128 up to 64 images, 512 from 256 on]", show_default=False)] = None,
    w0: Annotated[Optional[float], typer.Option(help=f"SIREN frequency factor of every sine layer. {_dflt(_M.w0)}", show_default=False)] = None,
    grid: Annotated[Optional[int], typer.Option(help=f"Nodes across the width of a latent grid each image also owns: interpolated at each point, it shifts the sine layers there, so detail has its own capacity; 0 for none. [default: auto: fitted as areas (--supersample above 1), one node per 2 pixels of the widest image, plus one (33 for 64 px icons); at pixel centres, none for up to 64 images of up to 128x128, else one node per 4 pixels plus one (17 for 64 px logos, 65 for a 256 px photo); fewer if the run's grids would pass 2^24 values]", show_default=False)] = None,
    grid_channels: Annotated[Optional[int], typer.Option(help=f"Values per node of the latent grid. {_dflt(_M.grid_channels)}", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak Adam learning rate of the shared weights (warm-up, then cosine decay). [default: auto: 1.5e-3 (1e-3 fitted as areas) when each image gives a step 128 points (field evaluations) or more, then falling as (points / 128)^1.6: 5e-4 at 64]", show_default=False)] = None,
    latent_lr: Annotated[Optional[float], typer.Option(help=f"Peak Adam learning rate of the latents. {_dflt(_T.latent_lr)}", show_default=False)] = None,
    batch_pixels: Annotated[Optional[str], typer.Option(help="Pixels per step, drawn evenly from all images, or 'all' for full batch. [default: auto: 8192 x sqrt(pixels per image / 128^2), within 8192-16384: 8192 for 64 px logos, 16384 from 256x256 on]", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help=f"Random seed (init and pixel sampling). {_dflt(_T.seed)}", show_default=False)] = None,
    snapshots: Annotated[Optional[str], typer.Option(help=f"Steps at which to save a reconstruction grid in RUN/snapshots, plus the last step; 'none' for only the last. {_dflt(_T.snapshots)}", show_default=False)] = None,
    background: Annotated[Optional[str], typer.Option(help=f"Colour that transparent pixels are composited onto: white, black, gray, #rrggbb or r,g,b. {_dflt(_T.background)}", show_default=False)] = None,
    checkpoint_every: Annotated[Optional[float], typer.Option(help=f"Seconds between periodic checkpoints. {_dflt(_T.checkpoint_seconds)}", show_default=False)] = None,
    log_every: Annotated[Optional[int], typer.Option(help=f"Steps between rows of loss.csv. {_dflt(_T.log_every)}", show_default=False)] = None,
    precision: Annotated[Optional[str], typer.Option(help=f"Matmul precision of the hidden layers in training: float32, tf32 (TensorFloat-32 on recent NVIDIA GPUs) or bf16 (bfloat16 operands, float32 sums). Rendering and metrics are always float32. {_dflt(_T.precision)}", show_default=False)] = None,
    edge_share: Annotated[Optional[float], typer.Option(help=f"Share of each step's pixels drawn where the images have edges (their colour gradient), re-weighted so the loss stays each image's MSE; 0 draws uniformly. {_dflt(_T.edge_share)}", show_default=False)] = None,
    grad_clip: Annotated[Optional[float], typer.Option(help=f"Scale the weights' gradient down to at most this many times the running mean of its norm (about the last 10 steps), which keeps a spike from growing into a collapse; 0 turns it off. {_dflt(_T.grad_clip)}", show_default=False)] = None,
    tv_weight: Annotated[Optional[float], typer.Option(help=f"With --supersample > 1: weight of a total-variation prior between each pixel's points (flat colours, sharp edges). {_dflt(_T.tv_weight)}", show_default=False)] = None,
    supersample: Annotated[Optional[int], typer.Option(help=f"Points per pixel per axis: each pixel is fitted as the mean of the field over an m x m grid of points at the centres of its sub-squares (the pixel as an area average: zoomed renders stay sharp), and renders average as many per output pixel; 1 fits pixel centres. [default: auto: {AREA_SUPERSAMPLE} for a folder of up to {GRID_FROM_IMAGES} images of up to 128 x 128 px (icons, logos), else 1]", show_default=False)] = None,
    area_pixels: Annotated[Optional[str], typer.Option(help=f"With --supersample > 1, which pixels are fitted as areas: all, or detail (those that differ from a neighbour; a flat pixel is the same all over, so it is fitted at one point drawn in its square each step, and each step covers more pixels). {_dflt(_T.area_pixels)}", show_default=False)] = None,
    batch_images: Annotated[Optional[str], typer.Option(help="Images per step, or 'auto': every image, unless that leaves fewer than 64 pixels each (then batch-pixels/64 images, taken in epochs of a random order). [default: auto]", show_default=False)] = None,
    devices: Annotated[str, typer.Option(help="Devices of this process to split each step's batch over: a number, 'all', or 'auto' (all GPUs/TPUs; one device on CPU).")] = "auto",
    workers: Annotated[Optional[int], typer.Option(help="Processes decoding the images of a large folder. [default: one per core]", show_default=False)] = None,
    coordinator: Annotated[Optional[str], typer.Option(help="Multi-host: HOST:PORT of process 0, the same for every process ('auto' lets JAX read SLURM/MPI settings). [env: NEURIMG_COORDINATOR]", show_default=False)] = None,
    num_processes: Annotated[Optional[int], typer.Option(help="Multi-host: number of processes. [env: NEURIMG_NUM_PROCESSES]", show_default=False)] = None,
    process_id: Annotated[Optional[int], typer.Option(help="Multi-host: this process's index, 0 .. num-processes - 1. [env: NEURIMG_PROCESS_ID]", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its checkpoint (same model; the images are re-read from PATHS or from where they were).")] = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit one SIREN (shared weights + a latent code per image) to a folder of images."""
    from neurimg import parallel
    from neurimg.engine import Interrupted
    from neurimg.fit import fit as run_fit
    from neurimg.progress import CountProgress, RichReporter, info
    from neurimg.runfolder import RunFolder

    paths = list(paths or [])
    output = _run_folder_option(paths, resume, overwrite, output, "fit", "RUN", "fit")
    model_over = _given(width=width, hidden_layers=hidden_layers, latent_dim=latent_dim, w0=None if w0 is None else float(w0), grid=grid, grid_channels=grid_channels)
    train_over = _given(
        steps=steps,
        lr=lr,
        latent_lr=latent_lr,
        batch_pixels=parse_batch_pixels(batch_pixels) if batch_pixels is not None else None,
        seed=seed,
        snapshots=parse_steps_list(snapshots) if snapshots is not None else None,
        background=parse_color(background) if background is not None else None,
        checkpoint_seconds=checkpoint_every,
        log_every=log_every,
        precision=precision,
        batch_images=parse_batch_images(batch_images) if batch_images is not None else None,
        edge_share=edge_share,
        grad_clip=grad_clip,
        supersample=supersample,
        area_pixels=area_pixels,
        tv_weight=tv_weight,
    )
    Config(dataclasses.replace(_M, **model_over), dataclasses.replace(_T, **train_over)).validate()  # options first
    device_spec = parallel.parse_devices(devices)
    if workers is not None and workers < 1:
        raise NeurimgError(f"--workers must be a positive integer, got {workers}")

    with parallel.cluster(coordinator, num_processes, process_id) as lead:
        quiet = quiet or not lead  # in a multi-process run only process 0 talks
        folder = RunFolder.open(output, resume=resume, overwrite=overwrite, lead=lead)
        base = folder.stored.config if folder.stored is not None else Config()
        cfg = Config(dataclasses.replace(base.model, **model_over), dataclasses.replace(base.train, **train_over)).validate()
        try:
            result = run_fit(
                paths, folder, cfg, overwrite=overwrite, reporter=None if quiet else RichReporter("fit"),
                devices=device_spec, workers=workers, load_progress=None if quiet else CountProgress(),
            )
        except Interrupted as e:
            raise Interrupted(e.step, f"checkpoint saved; resume with: neurimg fit --resume -o {output}", e.signum) from None
    on = f", {result.devices} devices" if result.devices > 1 else ""
    on += f" in {result.processes} processes" if result.processes > 1 else ""
    speed = f"{result.steps_per_second:.1f} steps/s{on}" if result.steps_per_second > 0 else "nothing trained"
    info(
        f"{count(result.images, 'image')}, {count(result.steps, 'step')}: mean PSNR {result.mean_psnr:.2f} dB "
        f"(worst {result.worst['psnr']:.2f} dB, {result.worst['name']}), "
        f"SSIM {result.mean_ssim:.4f} ({result.seconds:.1f} s, {speed}"
        + (f"; {count(result.rollbacks, 'rollback')}, {count(result.restarts, 'restart')}" if result.rollbacks or result.restarts else "")
        + f") -> {output}",
        quiet,
    )
    q = shlex.quote(output)
    info(f"next: neurimg render {q} -o out/ (PNGs at any --scale), neurimg view {q} (in a browser)", quiet)
    if json_out and lead:
        _emit_json(result.summary())


def _run_folder_option(paths: list[str], resume: bool, overwrite: bool, output: Optional[str], command: str, name: str, prefix: str) -> str:
    """-o of a training command (fit, blend-train): a folder, required with --resume, else
    runs/PREFIX-DATE-TIME; inputs required unless resuming; --resume and --overwrite exclude
    each other (one continues the run, the other deletes it)."""
    if resume and overwrite:
        raise NeurimgError("--resume continues the run and --overwrite replaces it: give one of them")
    if not paths and not resume:
        raise NeurimgError(f"no input given: pass a folder or image files (or --resume -o {name})")
    if resume and output is None:
        raise NeurimgError(f"--resume needs -o {name}, the folder to continue")
    if output == "-":
        raise NeurimgError(f"-o must be a folder for {command} (use --json for a summary on stdout)")
    return output or os.path.join("runs", time.strftime(f"{prefix}-%Y%m%d-%H%M%S"))


def _given(**values) -> dict:
    """The options the user gave (not None)."""
    return {k: v for k, v in values.items() if v is not None}


# --------------------------------------------------------------------------------------------
# render


@app.command(epilog=EXAMPLES["render"])
def render(
    run: Annotated[str, typer.Argument(help="Run folder (or its checkpoint.safetensors file).", show_default=False)],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="A folder (one PNG per image, named as its source), or with one image a PNG file or '-' for stdout. [default: RUN/render]", show_default=False)] = None,
    image: Annotated[Optional[str], typer.Option("--image", "-i", help="Render only this stored image: its name or its index (0-based).", show_default=False)] = None,
    size: Annotated[Optional[str], typer.Option(help="Output size WIDTHxHEIGHT, e.g. 1024x1024.", show_default=False)] = None,
    scale: Annotated[Optional[float], typer.Option(help="Output scale relative to the original (or region) size, e.g. 4 or 2.5.", show_default=False)] = None,
    region: Annotated[Optional[str], typer.Option(help="Crop x0,y0,x1,y1 in pixel units of the original (edges; 0,0 is the top-left corner).", show_default=False)] = None,
    mix: Annotated[Optional[str], typer.Option(help="A,B: render the field at a latent between two stored images (names or indices), (1-t) z_A + t z_B, on A's grid (--size, --scale and --region apply to A). Needs --t.", show_default=False)] = None,
    t: Annotated[Optional[float], typer.Option("--t", help="With --mix: where between A (0) and B (1), in [0, 1].", show_default=False)] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Render stored images at any resolution or crop (one PNG per image), or a mix of two."""
    from neurimg.api import load_run
    from neurimg.fieldnet import parse_t

    t0 = time.perf_counter()
    scale, sz = parse_out_size(scale, size)
    if output == "-" and json_out:
        raise NeurimgError("--json cannot be used with -o - (stdout carries the PNG)")
    if (mix is None) != (t is None):
        raise NeurimgError("--mix A,B and --t go together")
    if mix is not None and image is not None:
        raise NeurimgError("give --image or --mix, not both")
    if t is not None:
        parse_t(t)
    stored = load_run(run)
    default_dir = Path(run if Path(run).is_dir() else Path(run).parent) / "render"
    if mix is not None:
        results = [_render_mix(stored, mix, t, output, default_dir, scale, sz, region, quiet)]
    else:
        indices = [stored.find(image)] if image is not None else list(range(len(stored.images)))
        results = _render_stored(stored, indices, output, default_dir, scale, sz, region, quiet)
    if json_out:
        _emit_json({"run": str(run), "outputs": results, "seconds": round(time.perf_counter() - t0, 3)})


def _render_stored(stored, indices, output, default_dir, scale, size, region, quiet, default_file=None) -> list[dict]:
    """Render stored images to the paths of the output rule (`neurimg.data.output_paths`);
    shared by `render` and `upsample --from`. Sizes are checked before anything is written."""
    from neurimg.coords import parse_region
    from neurimg.data import output_paths, write_png
    from neurimg.progress import info

    targets = output_paths([stored.images[i].name for i in indices], output, default_file=default_file, default_folder=default_dir)
    jobs = []
    for i, target in zip(indices, targets):
        im = stored.images[i]
        reg = parse_region(region, im.width, im.height) if region is not None else None
        jobs.append((i, target, reg, stored.output_size(i, scale, size, reg)))
    results = []
    for i, target, reg, (ow, oh) in jobs:
        t1 = time.perf_counter()
        write_png(target, stored.render_index(i, (ow, oh), reg))
        info(f"{stored.images[i].name} -> {target} ({ow}x{oh})", quiet)
        results.append({"image": stored.images[i].name, "index": i, "path": target, "width": ow, "height": oh,
                        "seconds": round(time.perf_counter() - t1, 3)})
    return results


def _mix_pair(stored, text: str, option: str) -> tuple[int, int]:
    """Two different stored images named by 'A,B' (refused for a one-image run)."""
    if len(stored.images) < 2:
        raise NeurimgError(f"this run holds one image ({stored.images[0].name}); {option} needs a run of two or more")
    a, b = stored.find_pair(text, option)
    if a == b:
        raise NeurimgError(f"{option} names {stored.images[a].name} twice; give two different images")
    return a, b


def _render_mix(stored, mix, t, output, default_dir, scale, size, region, quiet) -> dict:
    """`render --mix A,B --t T`: the field at the latent mix, on A's grid."""
    from neurimg.coords import parse_region
    from neurimg.data import output_paths, write_png
    from neurimg.fieldnet import mix_latents
    from neurimg.progress import info

    a, b = _mix_pair(stored, mix, "--mix")
    ia, ib = stored.images[a], stored.images[b]
    name = f"{Path(ia.name).stem}-{Path(ib.name).stem}-t{t:g}.png"
    (target,) = output_paths([name], output, default_file=None, default_folder=default_dir)
    reg = parse_region(region, ia.width, ia.height) if region is not None else None
    ow, oh = stored.output_size(a, scale, size, reg)
    t1 = time.perf_counter()
    z = mix_latents(stored.latent(a), stored.latent(b), t)
    write_png(target, stored.render_latent(z, (ia.width, ia.height), (ow, oh), reg))
    info(f"{ia.name} .. {ib.name} at t={t:g} -> {target} ({ow}x{oh})", quiet)
    return {"mix": [ia.name, ib.name], "t": t, "path": target, "width": ow, "height": oh,
            "seconds": round(time.perf_counter() - t1, 3)}


# --------------------------------------------------------------------------------------------
# morph, export, view (issue 14)


@app.command(epilog=EXAMPLES["morph"])
def morph(
    run: Annotated[str, typer.Argument(help="Run folder (or its checkpoint.safetensors file) of two or more images.", show_default=False)],
    a: Annotated[str, typer.Argument(help="The first image: a stored name or index.", show_default=False)],
    b: Annotated[str, typer.Argument(help="The last image: a stored name or index.", show_default=False)],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Animation to write: .gif, or .mp4 (needs imageio-ffmpeg); '-' writes a GIF to stdout. [default: RUN/morph/A-B.gif]", show_default=False)] = None,
    frames: Annotated[int, typer.Option(help="Frames from A to B: the first is exactly A's latent, the last exactly B's.")] = 30,
    loop: Annotated[bool, typer.Option("--loop", help="Go back to A as well (A -> B -> A, no frame repeated), for a seamless repeating animation.")] = False,
    fps: Annotated[float, typer.Option(help="Frames per second.")] = 15.0,
    size: Annotated[Optional[str], typer.Option(help="Frame size WIDTHxHEIGHT. [default: A's size]", show_default=False)] = None,
    scale: Annotated[Optional[float], typer.Option(help="Frame size as a scale of A's size, e.g. 2.", show_default=False)] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write an animation of the field morphing from image A to image B (latents interpolated)."""
    from neurimg import morph as mo
    from neurimg.api import load_run
    from neurimg.fieldnet import mix_latents
    from neurimg.progress import CountProgress, info

    t0 = time.perf_counter()
    scale, sz = parse_out_size(scale, size)
    if not math.isfinite(fps) or not 0 < fps <= 100:
        raise NeurimgError(f"--fps must be in (0, 100], got {fps}")
    if output == "-" and json_out:
        raise NeurimgError("--json cannot be used with -o - (stdout carries the animation)")
    mo.frame_ts(frames)  # --frames checked before the run is read
    if output is not None:
        fmt = mo.animation_format(output)
    stored = load_run(run)
    ia, ib = _mix_pair(stored, f"{a},{b}", "morph")
    A, B = stored.images[ia], stored.images[ib]
    if output is None:
        output = str(Path(run if Path(run).is_dir() else Path(run).parent) / "morph" / f"{Path(A.name).stem}-{Path(B.name).stem}.gif")
        fmt = ".gif"
    ow, oh = stored.output_size(ia, scale, sz)
    shown = len(mo.order(frames, loop))
    mo.check_memory(fmt, shown, ow, oh)  # before anything is rendered
    za, zb = stored.latent(ia), stored.latent(ib)
    nbytes = mo.write(output, lambda tk: stored.render_latent(mix_latents(za, zb, tk), (A.width, A.height), (ow, oh)),
                      frames, fmt, fps, loop, progress=None if quiet else CountProgress(min_total=1, unit="frames"))
    info(f"{A.name} -> {B.name}: {shown} frames of {ow}x{oh} -> {output} ({nbytes / 1024:.0f} KiB)", quiet)
    if json_out:
        _emit_json({"run": str(run), "a": A.name, "b": B.name, "output": output, "frames": shown, "width": ow, "height": oh,
                    "fps": fps, "loop": loop, "bytes": nbytes, "seconds": round(time.perf_counter() - t0, 3)})


@app.command(epilog=EXAMPLES["export"])
def export(
    run: Annotated[str, typer.Argument(help="Run folder (or its checkpoint.safetensors file).", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="File to write, or '-' for stdout.", show_default=False)],
    format: Annotated[str, typer.Option("--format", help="Model format: onnx.")] = "onnx",
    image: Annotated[Optional[str], typer.Option("--image", "-i", help="Bake this stored image's latent in (name or index): the model then takes xy alone. [default: a 'latent' input; the stored latents are in the model's metadata]", show_default=False)] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export the fitted field as an ONNX model: xy (N, 2) [+ latent (N or 1, D)] -> rgb (N, 3)."""
    from neurimg.api import load_run
    from neurimg.data import write_output
    from neurimg.export import onnx_model
    from neurimg.fieldnet import FieldNet
    from neurimg.progress import info

    t0 = time.perf_counter()
    if format.lower() != "onnx":
        raise NeurimgError(f"--format must be onnx, got {format!r}")
    if output == "-" and json_out:
        raise NeurimgError("--json cannot be used with -o - (stdout carries the model)")
    stored = load_run(run)
    index = stored.find(image) if image is not None else None
    net = FieldNet.from_run(stored)
    data = onnx_model(net, index, run_name=Path(run).name)
    write_output(output, data)
    width = int(net.latents.shape[1])  # the latent, then any latent grid (`neurimg.siren`)
    what = f"image {net.names[index]} baked in" if index is not None else f"{count(len(net.names), 'image')}, latent input of {width}"
    info(f"ONNX model ({what}, {len(data) / 1024:.0f} KiB) -> {output}", quiet)
    if json_out:
        _emit_json({"run": str(run), "output": output, "format": "onnx", "bytes": len(data), "image": None if index is None else net.names[index],
                    "inputs": ["xy"] + ([] if index is not None else ["latent"]), "latent_dim": net.latent_dim, "latent_input": width,
                    "seconds": round(time.perf_counter() - t0, 3)})


@app.command(epilog=EXAMPLES["view"])
def view(
    run: Annotated[str, typer.Argument(help="Run folder (or its checkpoint.safetensors file).", show_default=False)],
    html: Annotated[Optional[str], typer.Option("--html", help="Write the viewer to this HTML file ('-' for stdout). [default: a file in a new private temporary folder, opened in the default browser]", show_default=False)] = None,
    open_browser: Annotated[Optional[bool], typer.Option("--open/--no-open", help="Open the page in the default browser. [default: only without --html]", show_default=False)] = None,
    weights: Annotated[str, typer.Option(help="How the page stores the network: auto (float16 when that keeps every checked image within 50 dB of float32, else float32), float16 or float32.")] = "auto",
    bare: Annotated[bool, typer.Option("--bare", help="Leave out the gallery thumbnails, loss curve and snapshots (a smaller file).")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write one self-contained HTML page that draws the field in the browser (WebGL2): pan and
    zoom at any magnification, a gallery, latent morphs, the loss curve and snapshots. It works
    offline, from file://. The page's URL query ?image=NAME&w=W&h=H&embed=1 shows only that
    image on a W x H canvas (as `neurimg render --size WxH`), then sets the title to
    'neurimg:ready'."""
    import tempfile
    import webbrowser

    from neurimg import viewer
    from neurimg.api import load_run
    from neurimg.data import write_output
    from neurimg.progress import info

    t0 = time.perf_counter()
    viewer.check_weights(weights)
    if html == "-" and (json_out or open_browser):
        raise NeurimgError("--html - writes the page to stdout: it cannot be combined with --json or --open")
    stored = load_run(run)
    page, summary = viewer.build(stored, run, weights=weights, extras=not bare)
    if html is None:
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(run).resolve().name)[:40] or "run"
        # A private folder (mode 0700, an unpredictable name): the page is the user's alone.
        html = os.path.join(tempfile.mkdtemp(prefix="neurimg-view-"), f"{stem}.html")
        if open_browser is None:
            open_browser = True
    write_output(html, page.encode("utf-8"))
    opened = False
    if html != "-":
        info(f"viewer ({count(summary['images'], 'image')}, weights {summary['weights']}, {summary['bytes'] / 1024:.0f} KiB) -> {html}", quiet)
        if open_browser:
            opened = bool(webbrowser.open(Path(html).resolve().as_uri()))
            if not opened:
                info("no browser could be opened here; open the file above in one", quiet)
    if json_out:
        _emit_json({"run": str(run), "html": html, **summary, "opened": opened, "seconds": round(time.perf_counter() - t0, 3)})


# --------------------------------------------------------------------------------------------
# blend (issue 4)


@app.command(epilog=EXAMPLES["blend"])
def blend(
    a: Annotated[str, typer.Argument(help="Image A, the canvas ('-' reads stdin).", show_default=False)],
    b: Annotated[str, typer.Argument(help="Image B, blended into A ('-' reads stdin).", show_default=False)],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="PNG file to write, or '-' for stdout. [default: A+B.png, from the inputs' names]", show_default=False)] = None,
    mode: Annotated[str, typer.Option(help=f"Target gradient: sum (grad A + grad B), mean (their average), mixed (per pixel the larger one), replace (grad B where B is: seamless cloning). {_dflt(_B.mode)}", show_default=False)] = _B.mode,
    solver: Annotated[str, typer.Option(help=f"siren (a neural field fitted to the exact solution, renderable at any --scale) or exact (the DCT Poisson solve on the pixel grid). {_dflt(_B.solver)}", show_default=False)] = _B.solver,
    color_weight: Annotated[float, typer.Option(help=f"Weight of a soft fidelity term towards the naive average (A+B)/2, in pixel units; 0 = only the mean colour is anchored. {_dflt(_B.color_weight)}", show_default=False)] = _B.color_weight,
    offset: Annotated[Optional[str], typer.Option(help="X,Y: where B's top-left pixel goes on A's canvas (may be negative; B must overlap A). [default: centred]", show_default=False)] = None,
    mask: Annotated[Optional[str], typer.Option(help="Image of B's size; B contributes where it is bright (> 0.5), A's gradient is kept elsewhere.", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps of the SIREN fit (the field trainer of neurimg fit, the blend being one image). [default: fit's, from the pixel count]", show_default=False)] = None,
    width: Annotated[Optional[int], typer.Option(help=f"Units per sine layer. [default: fit's, {WIDTH}]", show_default=False)] = None,
    hidden_layers: Annotated[Optional[int], typer.Option(help=f"Hidden sine layers after the first. [default: fit's, {_M.hidden_layers}]", show_default=False)] = None,
    w0: Annotated[Optional[float], typer.Option(help=f"SIREN frequency factor. [default: fit's, {_M.w0:g}]", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak Adam learning rate (warm-up, then cosine decay; lowered by the failure policy on a rollback or restart, see --json's rollbacks and restarts). [default: fit's, from the pixels per step]", show_default=False)] = None,
    batch_pixels: Annotated[Optional[int], typer.Option(help="Pixels per step of the fit. [default: fit's, from the pixels per image: 16384 from 256x256 on]", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help=f"Random seed (init and sampling). {_dflt(_B.seed)}", show_default=False)] = _B.seed,
    background: BackgroundOpt = None,
    scale: Annotated[Optional[float], typer.Option(help="Render the blended field at this scale of A's size (the SIREN is continuous; e.g. 4).", show_default=False)] = None,
    method: Annotated[str, typer.Option(help="poisson: solve the gradient-domain problem for this pair (--mode, --solver); gan: one forward pass of a GAN blender trained by neurimg blend-train (--model), for two images of one size (resized to the model's size and back, non-square ones padded with the background). [default: poisson]", show_default=False)] = "poisson",
    model: Annotated[Optional[str], typer.Option(help="With --method gan: the blender folder written by neurimg blend-train (or its checkpoint file). The compiled forward pass is kept in $NEURIMG_CACHE_DIR/jax (default ~/.cache/neurimg/jax; NEURIMG_CACHE_DIR=off for none).", show_default=False)] = None,
    levels: Annotated[Optional[str], typer.Option(help="With --method gan: C,M,F, A's share at the coarse, middle and fine levels (DCT bands of radius < S/8, < S/4 and the rest; the generator's style at its matching resolutions), each in [0, 1]: 0.5 is the blend itself, 1 takes that level from A, 0 from B, linearly in between. [default: 0.5,0.5,0.5]", show_default=False)] = None,
    noise_seed: Annotated[int, typer.Option(help="With --method gan: seed of the generator's per-pixel noise (stochastic detail). [default: 0]", show_default=False)] = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Blend B into A in the gradient domain, keeping the colours (Perez et al. 2003), or with a trained GAN blender (--method gan)."""
    import numpy as np

    if method not in ("poisson", "gan"):
        raise NeurimgError(f"--method must be poisson or gan, got {method!r}")
    if method == "gan":
        poisson_only = _given(offset=offset, mask=mask, steps=steps, width=width, hidden_layers=hidden_layers, w0=w0, lr=lr,
                              batch_pixels=batch_pixels, scale=scale)
        if poisson_only:
            raise NeurimgError(f"--{next(iter(poisson_only)).replace('_', '-')} applies to --method poisson, not gan")
        return _blend_gan(a, b, output, model, levels, noise_seed, background, json_out, quiet)
    if model is not None or levels is not None:
        raise NeurimgError("--model and --levels need --method gan")

    from neurimg import blend as bl
    from neurimg.coords import output_size
    from neurimg.data import output_paths, read_image, write_png
    from neurimg.progress import RichReporter, info

    cfg = BlendConfig(mode=mode, solver=solver, color_weight=color_weight, seed=seed, steps=steps, width=width, hidden_layers=hidden_layers,
                      w0=None if w0 is None else float(w0), lr=lr, batch_pixels=batch_pixels).validate()
    parse_scale(scale)
    off = bl.parse_offset(offset) if offset is not None else None
    if [a, b, mask].count("-") > 1:
        raise NeurimgError("'-' (stdin) can be given only once")
    if output == "-" and json_out:
        raise NeurimgError("--json cannot be used with -o - (stdout carries the PNG)")
    default = f"{'stdin' if a == '-' else Path(a).stem}+{'stdin' if b == '-' else Path(b).stem}.png"
    (output,) = output_paths([default], output, default_file=default, default_folder=".")
    bg = parse_color(background) if background is not None else (1.0, 1.0, 1.0)
    img_a, img_b = _read_pair(a, b, bg, quiet)
    m = None
    if mask is not None:
        m = read_image(mask, (0.0, 0.0, 0.0)).mean(-1) > 0.5  # transparent = outside
    h, w = img_a.shape[:2]
    out_size = output_size(w, h, scale=scale) if scale is not None else None
    reporter = None if quiet or cfg.solver == "exact" else RichReporter("blend")
    result = bl.blend(img_a, img_b, cfg, offset=off, mask=m, out_size=out_size, reporter=reporter)
    write_png(output, result.image)
    r = result.report
    info(
        f"blend {cfg.mode} ({cfg.solver}): PSNR vs exact {r['psnr_vs_exact']:.2f} dB, gradient cosine "
        f"{r['gradient_cosine']:.4f} ({r['seconds']:.1f} s) -> {output} ({r['width']}x{r['height']})",
        quiet,
    )
    if json_out:
        summary = {"a": a, "b": b, "output": output}
        summary.update({k: (round(v, 6) if isinstance(v, float) and np.isfinite(v) else v) for k, v in r.items()})
        _emit_json(summary)


def parse_levels(text: str) -> tuple[float, float, float]:
    """'C,M,F': three numbers in [0, 1]."""
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3 or not all(math.isfinite(v) and 0 <= v <= 1 for v in vals):
        raise NeurimgError(f"--levels must be three numbers in [0, 1] like 1,0.5,0 (coarse, middle, fine), got {text!r}")
    return vals  # type: ignore[return-value]


def _blend_gan(a, b, output, model, levels, noise_seed, background, json_out, quiet) -> None:
    """blend --method gan: one forward pass of a trained blender."""
    from neurimg import blend as bl
    from neurimg.blendgan import DEFAULT_LEVELS
    from neurimg.blender import Blender, use_compile_cache
    from neurimg.data import output_paths, write_png
    from neurimg.progress import info

    t0 = time.perf_counter()
    if model is None:
        raise NeurimgError("--method gan needs --model BLENDER (a folder written by neurimg blend-train)")
    lv = parse_levels(levels) if levels is not None else None
    if [a, b].count("-") > 1:
        raise NeurimgError("'-' (stdin) can be given only once")
    if output == "-" and json_out:
        raise NeurimgError("--json cannot be used with -o - (stdout carries the PNG)")
    default = f"{'stdin' if a == '-' else Path(a).stem}+{'stdin' if b == '-' else Path(b).stem}.png"
    (output,) = output_paths([default], output, default_file=default, default_folder=".")
    bg = parse_color(background) if background is not None else (1.0, 1.0, 1.0)
    use_compile_cache()  # the forward pass compiles once per machine, not once per blend
    blender = Blender.load(model)
    img_a, img_b = _read_pair(a, b, bg, quiet)
    t1 = time.perf_counter()
    out = blender.blend(img_a, img_b, lv, noise_seed, bg)
    seconds = time.perf_counter() - t1
    write_png(output, out)
    h, w = img_a.shape[:2]
    resized = (w, h) != (blender.cfg.size, blender.cfg.size)
    # scored against the exact solve of what the model learned (the naive average is the mean-gradient solve)
    r = bl.score(out, img_a, img_b, "mixed" if blender.cfg.target == "mixed" else "mean")
    used = lv if lv is not None else DEFAULT_LEVELS
    info(
        f"blend gan (target {blender.cfg.target}, levels {','.join(f'{v:.2f}' for v in used)}"
        + (f", resized from {w}x{h} to {blender.cfg.size}x{blender.cfg.size} and back" if resized else "")
        + f"): PSNR vs exact {r['psnr_vs_exact']:.2f} dB ({seconds:.2f} s) -> {output} ({w}x{h})",
        quiet,
    )
    if json_out:
        _emit_json({"a": a, "b": b, "output": output, "method": "gan", "model": model, "target": blender.cfg.target,
                    "levels": [round(v, 6) for v in used], "noise_seed": noise_seed,
                    "width": w, "height": h, "resized": resized, **{k: round(v, 6) for k, v in r.items()},
                    "seconds": round(seconds, 4), "total_seconds": round(time.perf_counter() - t0, 3)})


@app.command("blend-train", epilog=EXAMPLES["blend-train"])
def blend_train(
    paths: Annotated[Optional[list[str]], typer.Argument(help="Image files and/or folders (at least two images; each padded to a square with the background and resized to --size). Omit with --resume.", show_default=False)] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Blender folder to create (or continue with --resume). [default: runs/blender-DATE-TIME]", show_default=False)] = None,
    target: Annotated[Optional[str], typer.Option(help=f"The real combination of a pair: mixed (the exact mixed-gradient blend: per pixel the stronger gradient, solved over the full canvas) or naive ((A + B) / 2, the original proposal). {_dflt(_G.target)}", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help=f"Training steps in total (with --resume: a new total). {_dflt(_G.steps)}", show_default=False)] = None,
    batch: Annotated[Optional[int], typer.Option(help=f"Pairs per step. {_dflt(_G.batch)}", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help=f"Random seed (init, pairs, noise, augmentation). {_dflt(_G.seed)}", show_default=False)] = None,
    size: Annotated[Optional[int], typer.Option(help=f"The square the GAN works at (a multiple of 8). {_dflt(_G.size)}", show_default=False)] = None,
    channels: Annotated[Optional[int], typer.Option(help=f"Base channels of the generator and the discriminator. {_dflt(_G.channels)}", show_default=False)] = None,
    lr_g: Annotated[Optional[float], typer.Option(help=f"Adam learning rate of the generator. {_dflt(_G.lr_g)}", show_default=False)] = None,
    lr_d: Annotated[Optional[float], typer.Option(help=f"Adam learning rate of the discriminator. {_dflt(_G.lr_d)}", show_default=False)] = None,
    l1_weight: Annotated[Optional[float], typer.Option(help=f"Weight of the L1 distance to the target in the generator's loss. {_dflt(_G.l1_weight)}", show_default=False)] = None,
    adv_weight: Annotated[Optional[float], typer.Option(help=f"Weight of the adversarial term in the generator's loss (0: no GAN, an L1-trained network). {_dflt(_G.adv_weight)}", show_default=False)] = None,
    level_prob: Annotated[Optional[float], typer.Option(help=f"Share of training pairs drawn at random levels (A's share per level, what --levels sets at blend time), the rest at 0.5. {_dflt(_G.level_prob)}", show_default=False)] = None,
    ada_target: Annotated[Optional[float], typer.Option(help=f"ADA: the discriminator's E[sign D(real)] is steered to this by raising or lowering the augmentation probability p. {_dflt(_G.ada_target)}", show_default=False)] = None,
    symmetries: Annotated[Optional[bool], typer.Option("--symmetries/--no-symmetries", help="Train on pairs turned, flipped and with their colour channels permuted, targets recomputed for each. [default: on]", show_default=False)] = None,
    snapshots: Annotated[Optional[str], typer.Option(help=f"Steps at which to save a grid A | B | target | generated in BLENDER/snapshots, plus the last step; 'none' for only the last. {_dflt(_G.snapshots)}", show_default=False)] = None,
    checkpoint_every: Annotated[Optional[float], typer.Option(help=f"Seconds between periodic checkpoints. {_dflt(_G.checkpoint_seconds)}", show_default=False)] = None,
    log_every: Annotated[Optional[int], typer.Option(help=f"Steps between rows of loss.csv. {_dflt(_G.log_every)}", show_default=False)] = None,
    background: BackgroundOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the blender in --output from its checkpoint (its settings and stored images; --steps may set a new total).")] = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a conditional GAN blender on a folder: every pair of its images and their blend; then neurimg blend A B --method gan --model BLENDER."""
    from neurimg.blender import train
    from neurimg.engine import Interrupted
    from neurimg.progress import RichReporter, info

    paths = list(paths or [])
    output = _run_folder_option(paths, resume, overwrite, output, "blend-train", "BLENDER", "blender")
    over = _given(target=target, batch=batch, seed=seed, size=size, channels=channels, lr_g=lr_g, lr_d=lr_d,
                  l1_weight=l1_weight, adv_weight=adv_weight, level_prob=level_prob, ada_target=ada_target, symmetries=symmetries,
                  snapshots=parse_steps_list(snapshots) if snapshots is not None else None,
                  checkpoint_seconds=checkpoint_every, log_every=log_every)
    cfg = dataclasses.replace(_G, **over, **_given(steps=steps)).validate()
    if resume and over:
        raise NeurimgError(f"--resume continues with the stored settings; only --steps may change (got --{next(iter(over)).replace('_', '-')})")
    bg = parse_color(background) if background is not None else (1.0, 1.0, 1.0)
    try:
        result = train(paths, output, None if resume else cfg, resume=resume, overwrite=overwrite,
                       reporter=None if quiet else RichReporter("blend-train"), background=bg, steps=steps)
    except Interrupted as e:
        raise Interrupted(e.step, f"checkpoint saved; resume with: neurimg blend-train --resume -o {output}", e.signum) from None
    info(
        f"{count(result.images, 'image')}, {count(result.steps, 'step')}: PSNR vs the {result.target} targets {result.psnr:.2f} dB "
        f"(naive average {result.naive_psnr:.2f}{'' if result.target == 'mixed' else f', the inputs alone {result.baseline_psnr:.2f}'}), SSIM {result.ssim:.4f}, ADA p {result.p:.3f} "
        f"({result.seconds:.1f} s, {result.steps_per_second:.2f} steps/s) -> {output}",
        quiet,
    )
    if json_out:
        _emit_json(result.summary())


# --------------------------------------------------------------------------------------------
# upsample

@app.command(epilog=EXAMPLES["upsample"])
def upsample(
    images: Annotated[Optional[list[str]], typer.Argument(help="Image files and/or folders ('-' reads one image from stdin). Omit with --from.", show_default=False)] = None,
    scale: Annotated[Optional[float], typer.Option("--scale", "-s", help="Upsampling factor, any float > 0 (2, 2.5, 4, 8): the output has round(S*W) x round(S*H) pixels.", show_default=False)] = None,
    size: Annotated[Optional[str], typer.Option(help="Output size WIDTHxHEIGHT instead of --scale.", show_default=False)] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="One image: a PNG file or '-' for stdout [default: NAME@Sx.png; stdout for stdin]. Otherwise a folder, one PNG per image named as its input [default: upsampled].", show_default=False)] = None,
    from_run: Annotated[Optional[str], typer.Option("--from", help="Render an image stored in this fitted run (neurimg fit) instead of fitting one.", show_default=False)] = None,
    image: Annotated[Optional[str], typer.Option("--image", "-i", help="With --from: the stored image's name or index [default: all of them].", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help=f"Optimizer steps per image. {_dflt(_U.steps)}", show_default=False)] = None,
    width: Annotated[Optional[int], typer.Option(help=f"Units per sine layer. {_dflt(_U.width)}", show_default=False)] = None,
    hidden_layers: Annotated[Optional[int], typer.Option(help=f"Hidden sine layers after the first. {_dflt(_U.hidden_layers)}", show_default=False)] = None,
    w0: Annotated[Optional[float], typer.Option(help=f"SIREN frequency factor. {_dflt(_U.w0)}", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"Peak Adam learning rate (warm-up, then cosine decay). {_dflt(_U.lr)}", show_default=False)] = None,
    tv_weight: Annotated[Optional[float], typer.Option(help=f"Weight of the total-variation prior on the sharp image (0 = off). {_dflt(_U.tv_weight)}", show_default=False)] = None,
    supersample: Annotated[Optional[int], typer.Option(help=f"Sub-points per input pixel per axis in the area-average fit (0 = auto: max(3, ceil(scale)), at most 8). {_dflt(_U.supersample)}", show_default=False)] = None,
    batch_pixels: Annotated[Optional[int], typer.Option(help=f"Input pixels per step. {_dflt(_U.batch_pixels)}", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help=f"Random seed. {_dflt(_U.seed)}", show_default=False)] = None,
    method: Annotated[Optional[str], typer.Option(help=f"'auto': chosen per image by self-validation (the input downsampled once more and upsampled back, scored against the input); 'field': fit a SIREN to the pixels' area averages (flat colours, sharp edges); 'internal': a small CNN trained on the image's own smaller copies (photos); 'backproject': consistent bicubic, no training. {_dflt(_U.method)}", show_default=False)] = None,
    internal_steps: Annotated[Optional[int], typer.Option(help=f"Adam steps of the internal CNN. {_dflt(_U.internal_steps)}", show_default=False)] = None,
    internal_width: Annotated[Optional[int], typer.Option(help=f"Channels of the internal CNN. {_dflt(_U.internal_width)}", show_default=False)] = None,
    internal_layers: Annotated[Optional[int], typer.Option(help=f"3x3 convolutions of the internal CNN. {_dflt(_U.internal_layers)}", show_default=False)] = None,
    background: BackgroundOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Upsample images: by default each image gets, by self-validation, either a SIREN fitted to how its pixels were formed (flat colours, sharp edges) or a CNN trained on its own smaller copies (photos)."""
    import numpy as np

    from neurimg import upsample as up
    from neurimg.data import load_images, output_paths, write_png
    from neurimg.progress import RichReporter, info

    t0 = time.perf_counter()
    scale, sz = parse_out_size(scale, size, required=True)
    label = f"{scale:g}x" if scale is not None else f"{sz[0]}x{sz[1]}"
    if from_run is not None and images:
        raise NeurimgError("give input images or --from RUN, not both")
    if image is not None and from_run is None:
        raise NeurimgError("--image selects a stored image and needs --from RUN")
    if output == "-" and json_out:
        raise NeurimgError("--json cannot be used with -o - (stdout carries the PNG)")
    over = _given(steps=steps, width=width, hidden_layers=hidden_layers, w0=None if w0 is None else float(w0), lr=lr,
                  tv_weight=None if tv_weight is None else float(tv_weight), supersample=supersample,
                  batch_pixels=batch_pixels, seed=seed, method=method, internal_steps=internal_steps,
                  internal_width=internal_width, internal_layers=internal_layers)
    cfg = dataclasses.replace(_U, **over).validate()
    _check_upsample_options(over, from_run, background)

    if from_run is not None:
        from neurimg.api import load_run

        stored = load_run(from_run)
        indices = [stored.find(image)] if image is not None else list(range(len(stored.images)))
        default = f"{Path(stored.images[indices[0]].name).stem}@{label}.png"
        results = _render_stored(stored, indices, output, "upsampled", scale, sz, None, quiet, default_file=default)
        fit_psnr = _stored_psnr(from_run)
        for r in results:
            r["input"] = r.pop("image")
            r["fit_psnr"] = fit_psnr.get(r["input"])
    else:
        bg = parse_color(background) if background is not None else (1.0, 1.0, 1.0)
        notes: list[str] = []
        imgs = load_images(list(images or []), bg, notes)
        _say_notes(notes, quiet)
        sizes = [up.output_size(im.width, im.height, scale, sz) for im in imgs]  # refuse before fitting
        single_stdin = len(imgs) == 1 and imgs[0].source == "-"
        default = "-" if single_stdin else f"{Path(imgs[0].name).stem}@{label}.png"
        targets = output_paths([im.name for im in imgs], output, default_file=default, default_folder="upsampled")
        results = []
        for im, (ow, oh), target in zip(imgs, sizes, targets):
            rep = None if quiet else RichReporter(f"upsample {im.name}")
            res = up.upsample(im.pixels, (ow, oh), cfg, rep, dtype=np.uint8)
            write_png(target, res.image)
            info(f"{im.name} ({im.width}x{im.height}) -> {target} ({ow}x{oh}), {res.method}, fit PSNR {res.fit_psnr:.2f} dB, "
                 f"{res.seconds:.1f} s", quiet)
            r = res.report()
            results.append({"input": im.name, "path": target, "input_width": im.width, "input_height": im.height, **r})
    if json_out:
        _emit_json({"outputs": results, "config": dataclasses.asdict(cfg) if from_run is None else None,
                    "seconds": round(time.perf_counter() - t0, 3)})


# The options of upsample that each method reads (`seed` serves both learned methods).
_FIELD_OPTIONS = ("steps", "width", "hidden_layers", "w0", "lr", "tv_weight", "supersample", "batch_pixels", "seed")
_INTERNAL_OPTIONS = ("internal_steps", "internal_width", "internal_layers", "seed")


def _check_upsample_options(given: dict, from_run: Optional[str], background: Optional[str]) -> None:
    """Refuse options that would be silently ignored: any training option (or --background)
    with --from RUN, which renders a stored field; field options with --method internal or
    backproject; the CNN's options with --method field or backproject ('auto' may use both)."""
    def flags(keys) -> str:
        return ", ".join(f"--{k.replace('_', '-')}" for k in keys)

    if from_run is not None:
        unused = [k for k in given] + (["background"] if background is not None else [])
        if unused:
            raise NeurimgError(f"{flags(unused)}: not used with --from RUN (it renders the stored field; nothing is fitted)")
        return
    method = given.get("method", _U.method)
    used = {"auto": _FIELD_OPTIONS + _INTERNAL_OPTIONS, "field": _FIELD_OPTIONS, "internal": _INTERNAL_OPTIONS, "backproject": ()}[method]
    unused = [k for k in given if k != "method" and k not in used]
    if unused:
        raise NeurimgError(f"{flags(unused)}: not used by --method {method}" + (" (options of the field method)" if method == "internal" else ""))


def _stored_psnr(run: str) -> dict:
    """Per-image PSNR from RUN/metrics.json (empty if the run has none)."""
    p = Path(run if Path(run).is_dir() else Path(run).parent) / "metrics.json"
    try:
        return {m["name"]: m["psnr"] for m in json.loads(p.read_text())["images"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# --------------------------------------------------------------------------------------------
# entry point with one-line errors


def _debug() -> bool:
    return os.environ.get("NEURIMG_DEBUG", "") not in ("", "0", "false", "no")


class _Terminated(BaseException):
    """SIGTERM outside a training loop (inside one, the loop saves what it keeps first)."""


def _on_sigterm(signum, frame):
    raise _Terminated


def main(argv: Optional[list[str]] = None) -> int:
    """Run the CLI; returns the exit code (used by the console script and the tests).

    Ctrl-C and SIGTERM: a command that trains keeps its checkpoint (where it has one) and
    exits 130 (Ctrl-C) or 143 (SIGTERM) with one line, as does any other command."""
    from neurimg.engine import Interrupted

    args = sys.argv[1:] if argv is None else list(argv)
    if not args:  # bare `neurimg`: its help, as `neurimg --help`
        args = ["--help"]
    try:
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not in the main thread
        old_term = None
    try:
        rv = app(args=args, prog_name="neurimg", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except Interrupted as e:
        what = "terminated" if e.signum == signal.SIGTERM else "interrupted"
        print(f"neurimg: {what} at step {e.step}" + (f"; {e.detail}" if e.detail else ""), file=sys.stderr)
        return e.exit_code
    except _Terminated:
        print("neurimg: terminated", file=sys.stderr)
        return 143
    except NeurimgError as e:
        if _debug():
            import traceback

            traceback.print_exc()
        print(f"neurimg: error: {e.message}", file=sys.stderr)
        return e.exit_code
    except typer.Exit as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except KeyboardInterrupt:
        print("neurimg: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # a write to stdout outside `data.write_stdout`
        from neurimg.data import BROKEN_PIPE_EXIT, _drop_stdout

        _drop_stdout()
        print("neurimg: error: stdout: the reader went away (broken pipe)", file=sys.stderr)
        return BROKEN_PIPE_EXIT
    except Exception as e:
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # Click usage errors
            if _debug():
                import traceback

                traceback.print_exc()
            msg = " ".join(str(e.format_message()).split())
            print(f"neurimg: error: {msg} (see neurimg --help)", file=sys.stderr)
            return int(e.exit_code) if int(e.exit_code) != 1 else 2
        if type(e).__name__ == "Abort":
            print("neurimg: aborted", file=sys.stderr)
            return 130
        if _debug():
            raise
        print(f"neurimg: internal error: {type(e).__name__}: {e} (set NEURIMG_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
