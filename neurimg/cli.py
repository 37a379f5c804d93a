"""The `neurimg` command line: thin Typer commands over the library.

Errors: a `NeurimgError` (or a usage error) becomes one line on stderr, `neurimg: error: ...`,
and exit code 2 (1 for run-time failures such as divergence); Ctrl-C during training saves a
checkpoint and exits 130. Set NEURIMG_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from neurimg.config import Config, ModelConfig, TrainConfig
from neurimg.errors import NeurimgError

app = typer.Typer(
    name="neurimg",
    help="Images as neural fields: fit SIREN networks to images, render them at any size.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts hold literal "[default: ...]": not Rich markup
    context_settings={"help_option_names": ["-h", "--help"]},
)

_M, _T = ModelConfig(), TrainConfig()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or messages on stderr.")]


def _emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


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


def parse_scale(value: Optional[float]) -> Optional[float]:
    if value is None:
        return None
    if not math.isfinite(value) or value <= 0:
        raise NeurimgError(f"--scale must be a positive finite number, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# fit


@app.command()
def fit(
    paths: Annotated[Optional[list[str]], typer.Argument(help="Image files and/or folders of images ('-' reads one image from stdin). May be omitted with --resume.", show_default=False)] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Run folder to create (or continue with --resume). [default: runs/fit-DATE-TIME]", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help=f"Optimizer steps in total. [default: {_T.steps}]", show_default=False)] = None,
    width: Annotated[Optional[int], typer.Option(help=f"Units per sine layer. [default: {_M.width}]", show_default=False)] = None,
    hidden_layers: Annotated[Optional[int], typer.Option(help=f"Hidden (width x width) sine layers, after the first. [default: {_M.hidden_layers}]", show_default=False)] = None,
    latent_dim: Annotated[Optional[int], typer.Option(help=f"Size of each image's latent code. [default: {_M.latent_dim}]", show_default=False)] = None,
    w0: Annotated[Optional[float], typer.Option(help=f"SIREN frequency factor of every sine layer. [default: {_M.w0:g}]", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"Peak Adam learning rate of the shared weights (warm-up, then cosine decay). [default: {_T.lr:g}]", show_default=False)] = None,
    latent_lr: Annotated[Optional[float], typer.Option(help=f"Peak Adam learning rate of the latents. [default: {_T.latent_lr:g}]", show_default=False)] = None,
    batch_pixels: Annotated[Optional[str], typer.Option(help=f"Pixels per step, drawn evenly from all images, or 'all' for full batch. [default: {_T.batch_pixels}]", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help=f"Random seed (init and pixel sampling). [default: {_T.seed}]", show_default=False)] = None,
    snapshots: Annotated[Optional[str], typer.Option(help="Steps at which to save a reconstruction grid in RUN/snapshots, plus the last step; 'none' for only the last. [default: 1,500,1000]", show_default=False)] = None,
    background: Annotated[Optional[str], typer.Option(help="Colour that transparent pixels are composited onto: white, black, gray, #rrggbb or r,g,b. [default: white]", show_default=False)] = None,
    checkpoint_every: Annotated[Optional[float], typer.Option(help=f"Seconds between periodic checkpoints. [default: {_T.checkpoint_seconds:g}]", show_default=False)] = None,
    log_every: Annotated[Optional[int], typer.Option(help=f"Steps between rows of loss.csv. [default: {_T.log_every}]", show_default=False)] = None,
    precision: Annotated[Optional[str], typer.Option(help="Matmul precision of the hidden layers in training: float32, tf32 (TensorFloat-32 on recent NVIDIA GPUs) or bf16 (bfloat16 operands, float32 sums). Rendering and metrics are always float32. [default: float32]", show_default=False)] = None,
    batch_images: Annotated[Optional[str], typer.Option(help="Images per step, or 'auto': every image, unless that leaves fewer than 64 pixels each (then batch-pixels/64 images, taken in epochs of a random order). [default: auto]", show_default=False)] = None,
    devices: Annotated[str, typer.Option(help="Devices of this process to split each step's batch over: a number, 'all', or 'auto' (all GPUs/TPUs; one device on CPU).")] = "auto",
    workers: Annotated[Optional[int], typer.Option(help="Processes decoding the images of a large folder. [default: one per core]", show_default=False)] = None,
    coordinator: Annotated[Optional[str], typer.Option(help="Multi-host: HOST:PORT of process 0, the same for every process ('auto' lets JAX read SLURM/MPI settings). [env: NEURIMG_COORDINATOR]", show_default=False)] = None,
    num_processes: Annotated[Optional[int], typer.Option(help="Multi-host: number of processes. [env: NEURIMG_NUM_PROCESSES]", show_default=False)] = None,
    process_id: Annotated[Optional[int], typer.Option(help="Multi-host: this process's index, 0 .. num-processes - 1. [env: NEURIMG_PROCESS_ID]", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its checkpoint (same model; the images are re-read from PATHS or from where they were).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run in --output.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit one SIREN (shared weights + a latent code per image) to a folder of images."""
    from neurimg import checkpoint as ckpt
    from neurimg import parallel
    from neurimg.progress import info

    paths = list(paths or [])
    if not paths and not resume:
        raise NeurimgError("no input given: pass a folder or image files (or --resume -o RUN)")
    if resume and output is None:
        raise NeurimgError("--resume needs -o RUN, the run folder to continue")
    if output is None:
        output = os.path.join("runs", time.strftime("fit-%Y%m%d-%H%M%S"))
    if output == "-":
        raise NeurimgError("-o must be a folder for fit (use --json for a summary on stdout)")

    model_over = {k: v for k, v in dict(width=width, hidden_layers=hidden_layers, latent_dim=latent_dim, w0=w0).items() if v is not None}
    train_over = {
        k: v
        for k, v in dict(
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
        ).items()
        if v is not None
    }
    if "w0" in model_over:
        model_over["w0"] = float(model_over["w0"])
    base = Config()
    if resume:
        if not ckpt.checkpoint_path(output).exists():
            raise NeurimgError(f"cannot resume: {ckpt.checkpoint_path(output)} does not exist")
        base = ckpt.load(ckpt.checkpoint_path(output)).config
    cfg = Config(
        model=dataclasses.replace(base.model, **model_over),
        train=dataclasses.replace(base.train, **train_over),
    ).validate()

    device_spec = parallel.parse_devices(devices)
    if workers is not None and workers < 1:
        raise NeurimgError(f"--workers must be a positive integer, got {workers}")
    with contextlib.ExitStack() as stack:
        if parallel.wants_distributed(coordinator, num_processes, process_id):
            stack.enter_context(parallel.native_stdout_to_stderr())
        result, lead = _fit_run(paths, output, cfg, resume, overwrite, quiet, device_spec, workers, coordinator, num_processes, process_id)
        if result is None:
            raise typer.Exit(130)
    quiet = quiet or not lead
    on = f", {result.devices} devices" if result.devices > 1 else ""
    on += f" in {result.processes} processes" if result.processes > 1 else ""
    info(
        f"{result.images} images, {result.steps} steps: mean PSNR {result.mean_psnr:.2f} dB, "
        f"SSIM {result.mean_ssim:.4f} ({result.seconds:.1f} s, {result.steps_per_second:.1f} steps/s{on}) -> {output}",
        quiet,
    )
    if json_out and lead:
        _emit_json(result.summary())


def _fit_run(paths, output, cfg, resume, overwrite, quiet, device_spec, workers, coordinator, num_processes, process_id):
    """Join the cluster if asked, fit, leave the cluster: (result or None if interrupted by
    Ctrl-C, whether this is process 0)."""
    from neurimg import parallel
    from neurimg.fit import Interrupted, fit as run_fit
    from neurimg.progress import LoadProgress, RichReporter, info

    distributed = parallel.initialize(coordinator, num_processes, process_id)
    import jax

    lead = jax.process_index() == 0
    quiet = quiet or not lead  # in a multi-process run only process 0 talks
    reporter = None if quiet else RichReporter("fit")
    try:
        return run_fit(
            paths, output, cfg, resume=resume, overwrite=overwrite, reporter=reporter, devices=device_spec,
            workers=workers, load_progress=None if quiet else LoadProgress(),
        ), lead
    except Interrupted as e:
        info(f"neurimg: interrupted at step {e.step}; resume with: neurimg fit --resume -o {output}", quiet)
        return None, lead
    finally:
        if distributed:
            jax.distributed.shutdown()


# --------------------------------------------------------------------------------------------
# render


@app.command()
def render(
    run: Annotated[str, typer.Argument(help="Run folder (or its checkpoint.safetensors file).", show_default=False)],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Folder for all images; with --image, a PNG file or '-' for stdout. [default: RUN/render]", show_default=False)] = None,
    image: Annotated[Optional[str], typer.Option("--image", "-i", help="Render only this stored image: its name or its index (0-based).", show_default=False)] = None,
    size: Annotated[Optional[str], typer.Option(help="Output size WIDTHxHEIGHT, e.g. 1024x1024.", show_default=False)] = None,
    scale: Annotated[Optional[float], typer.Option(help="Output scale relative to the original (or region) size, e.g. 4 or 2.5.", show_default=False)] = None,
    region: Annotated[Optional[str], typer.Option(help="Crop x0,y0,x1,y1 in pixel units of the original (edges; 0,0 is the top-left corner).", show_default=False)] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Render stored images at any resolution or crop (one PNG per image)."""
    from neurimg.api import load_run
    from neurimg.coords import output_size, parse_region, parse_size
    from neurimg.data import write_png
    from neurimg.progress import info

    t0 = time.perf_counter()
    parse_scale(scale)
    sz = parse_size(size) if size is not None else None
    if sz is not None and scale is not None:
        raise NeurimgError("give --scale or --size, not both")
    model = load_run(run)
    if image is not None:
        indices = [model.find(image)]
    else:
        indices = list(range(len(model.images)))
        if output == "-":
            raise NeurimgError("-o - (stdout) needs --image: only one PNG can go to stdout")
    if output == "-" and json_out:
        raise NeurimgError("--json cannot be used with -o - (stdout carries the PNG)")
    if output is None:
        out_dir = Path(run if Path(run).is_dir() else Path(run).parent) / "render"
        targets = [out_dir / model.images[i].name for i in indices]
    elif image is not None and (output == "-" or Path(output).suffix.lower() == ".png") and not Path(output).is_dir():
        targets = [output]
    else:
        targets = [Path(output) / model.images[i].name for i in indices]
    results = []
    for i, target in zip(indices, targets):
        info_ = model.images[i]
        reg = parse_region(region, info_.width, info_.height) if region is not None else None
        ow, oh = output_size(info_.width, info_.height, reg, scale, sz)
        pixels = model.renderer.render(i, (info_.width, info_.height), (ow, oh), reg)
        target_s = str(target)
        if target_s != "-" and Path(target_s).suffix.lower() != ".png":
            target_s = str(Path(target_s).with_suffix(".png"))
        write_png(target_s, pixels)
        info(f"{info_.name} -> {target_s} ({ow}x{oh})", quiet)
        results.append({"image": info_.name, "index": i, "path": target_s, "width": ow, "height": oh})
    if json_out:
        _emit_json({"run": str(run), "outputs": results, "seconds": round(time.perf_counter() - t0, 3)})


# --------------------------------------------------------------------------------------------
# blend (issue 4)


@app.command()
def blend(
    a: Annotated[str, typer.Argument(help="Image A, the canvas ('-' reads stdin).", show_default=False)],
    b: Annotated[str, typer.Argument(help="Image B, blended into A ('-' reads stdin).", show_default=False)],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="PNG file to write, or '-' for stdout. [default: A+B.png, from the inputs' names]", show_default=False)] = None,
    mode: Annotated[str, typer.Option(help="Target gradient: sum (grad A + grad B), mean (their average), mixed (per pixel the larger one), replace (grad B where B is: seamless cloning).")] = "sum",
    order: Annotated[int, typer.Option(help="1: fit the gradient; 2: fit the Laplacian (its divergence).")] = 1,
    solver: Annotated[str, typer.Option(help="siren (fit a neural field) or exact (DCT Poisson solve on the pixel grid).")] = "siren",
    color_weight: Annotated[float, typer.Option(help="Weight of a soft fidelity term towards the naive average (A+B)/2, in pixel units; 0 = only the mean colour is anchored.")] = 0.0,
    offset: Annotated[Optional[str], typer.Option(help="X,Y: where B's top-left pixel goes on A's canvas (may be negative; B must overlap A). [default: centred]", show_default=False)] = None,
    mask: Annotated[Optional[str], typer.Option(help="Image of B's size; B contributes where it is bright (> 0.5), A's gradient is kept elsewhere.", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps of the SIREN fit. [default: 1500]", show_default=False)] = None,
    width: Annotated[Optional[int], typer.Option(help="Units per sine layer. [default: 96]", show_default=False)] = None,
    w0: Annotated[Optional[float], typer.Option(help="SIREN frequency factor. [default: 30]", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak Adam learning rate (warm-up, then cosine decay). [default: 0.0007; 0.0001 with --order 2]", show_default=False)] = None,
    batch_pairs: Annotated[Optional[int], typer.Option(help="Pixel pairs per direction per step (the derivative is averaged over 2 random points of each). [default: 512]", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Random seed (init and sampling).")] = 0,
    background: Annotated[Optional[str], typer.Option(help="Colour that transparent pixels are composited onto: white, black, gray, #rrggbb or r,g,b. [default: white]", show_default=False)] = None,
    scale: Annotated[Optional[float], typer.Option(help="Render the blended field at this scale of A's size (the SIREN is continuous; e.g. 4).", show_default=False)] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Blend B into A in the gradient domain, keeping the colours (Perez et al. 2003)."""
    import numpy as np

    from neurimg import blend as bl
    from neurimg.coords import output_size
    from neurimg.data import read_image, write_png
    from neurimg.progress import RichReporter, info

    over = {k: v for k, v in dict(steps=steps, width=width, w0=w0, lr=lr, batch_pairs=batch_pairs).items() if v is not None}
    if "w0" in over:
        over["w0"] = float(over["w0"])
    cfg = bl.BlendConfig(mode=mode, order=order, solver=solver, color_weight=color_weight, seed=seed, **over).validate()
    parse_scale(scale)
    off = bl.parse_offset(offset) if offset is not None else None
    if [a, b, mask].count("-") > 1:
        raise NeurimgError("'-' (stdin) can be given only once")
    if output is None:
        output = f"{'stdin' if a == '-' else Path(a).stem}+{'stdin' if b == '-' else Path(b).stem}.png"
    if output == "-" and json_out:
        raise NeurimgError("--json cannot be used with -o - (stdout carries the PNG)")
    bg = parse_color(background) if background is not None else (1.0, 1.0, 1.0)
    img_a, img_b = read_image(a, bg), read_image(b, bg)
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


# --------------------------------------------------------------------------------------------
# upsample

@app.command()
def upsample(
    images: Annotated[Optional[list[str]], typer.Argument(help="Image files and/or folders ('-' reads one image from stdin). Omit with --from.", show_default=False)] = None,
    scale: Annotated[Optional[float], typer.Option("--scale", "-s", help="Upsampling factor, any float > 0 (2, 2.5, 4, 8): the output has round(S*W) x round(S*H) pixels.", show_default=False)] = None,
    size: Annotated[Optional[str], typer.Option(help="Output size WIDTHxHEIGHT instead of --scale.", show_default=False)] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="One input: a PNG file or '-' for stdout [default: NAME@Sx.png; stdout for stdin]. Several inputs or a folder: a folder, one PNG per input with the same name [default: upsampled].", show_default=False)] = None,
    from_run: Annotated[Optional[str], typer.Option("--from", help="Render an image stored in this fitted run (neurimg fit) instead of fitting one.", show_default=False)] = None,
    image: Annotated[Optional[str], typer.Option("--image", "-i", help="With --from: the stored image's name or index [default: all of them].", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps per image. [default: 600]", show_default=False)] = None,
    width: Annotated[Optional[int], typer.Option(help="Units per sine layer. [default: 64]", show_default=False)] = None,
    hidden_layers: Annotated[Optional[int], typer.Option(help="Hidden sine layers after the first. [default: 3]", show_default=False)] = None,
    w0: Annotated[Optional[float], typer.Option(help="SIREN frequency factor. [default: 45]", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak Adam learning rate. [default: 0.001]", show_default=False)] = None,
    tv_weight: Annotated[Optional[float], typer.Option(help="Weight of the total-variation prior on the sharp image (0 = off). [default: 0.001]", show_default=False)] = None,
    supersample: Annotated[Optional[int], typer.Option(help="Sub-points per input pixel per axis in the area-average fit (0 = auto: max(3, ceil(scale))). [default: 0]", show_default=False)] = None,
    batch_pixels: Annotated[Optional[int], typer.Option(help="Input pixels per step. [default: 512]", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed. [default: 0]", show_default=False)] = None,
    base: Annotated[Optional[str], typer.Option(help="'none': the network is the whole image (best for logos); 'bilinear': it learns the residual over bilinear interpolation (better for photos). [default: none]", show_default=False)] = None,
    background: Annotated[Optional[str], typer.Option(help="Colour transparent pixels are composited onto: white, black, gray, #rrggbb or r,g,b. [default: white]", show_default=False)] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Upsample images by fitting a SIREN to how their pixels were formed and rendering it finer."""
    from neurimg.coords import parse_size
    from neurimg.data import load_images, write_png
    from neurimg.progress import RichReporter, info
    from neurimg import upsample as up

    t0 = time.perf_counter()
    parse_scale(scale)
    sz = parse_size(size) if size is not None else None
    if (scale is None) == (sz is None):
        raise NeurimgError("give --scale S or --size WxH (one of them)")
    label = f"{scale:g}x" if scale is not None else f"{sz[0]}x{sz[1]}"
    if from_run is not None and images:
        raise NeurimgError("give input images or --from RUN, not both")
    if image is not None and from_run is None:
        raise NeurimgError("--image selects a stored image and needs --from RUN")
    if output == "-" and json_out:
        raise NeurimgError("--json cannot be used with -o - (stdout carries the PNG)")

    over = dict(steps=steps, width=width, hidden_layers=hidden_layers, w0=w0, lr=lr, tv_weight=tv_weight,
                supersample=supersample, batch_pixels=batch_pixels, seed=seed, base=base)
    over = {k: v for k, v in over.items() if v is not None}
    if "w0" in over:
        over["w0"] = float(over["w0"])
    if "tv_weight" in over:
        over["tv_weight"] = float(over["tv_weight"])
    cfg = dataclasses.replace(up.UpsampleConfig(), **over).validate()

    def targets_for(names: list[str], single_stdin: bool) -> list[str]:
        if len(names) == 1 and (output is None or output == "-" or Path(output).suffix.lower() == ".png") and not (output and Path(output).is_dir()):
            if output is not None:
                return [output]
            return ["-" if single_stdin else f"{Path(names[0]).stem}@{label}.png"]
        if output == "-":
            raise NeurimgError("-o - (stdout) takes one image; give one input or -o DIR")
        if output is not None and Path(output).suffix.lower() == ".png":
            raise NeurimgError(f"-o {output} is a file but there are {len(names)} images; give a folder")
        folder = Path(output or "upsampled")
        return [str(folder / (Path(n).stem + ".png")) for n in names]

    results = []
    if from_run is not None:
        from neurimg.api import load_run

        run = load_run(from_run)
        indices = [run.find(image)] if image is not None else list(range(len(run.images)))
        names = [run.images[i].name for i in indices]
        stored = _stored_psnr(from_run)
        for i, target in zip(indices, targets_for(names, False)):
            t1 = time.perf_counter()
            info_ = run.images[i]
            ow, oh = up.output_size(info_.width, info_.height, scale, sz)
            write_png(target, run.renderer.render(i, (info_.width, info_.height), (ow, oh)))
            info(f"{info_.name} -> {target} ({ow}x{oh})", quiet)
            results.append({"input": info_.name, "path": target, "width": ow, "height": oh,
                            "fit_psnr": stored.get(info_.name), "seconds": round(time.perf_counter() - t1, 3)})
    else:
        bg = parse_color(background) if background is not None else (1.0, 1.0, 1.0)
        imgs = load_images(list(images or []), bg)
        sizes = [up.output_size(im.width, im.height, scale, sz) for im in imgs]  # refuse before fitting
        single_stdin = len(imgs) == 1 and imgs[0].source == "-"
        for im, (ow, oh), target in zip(imgs, sizes, targets_for([im.name for im in imgs], single_stdin)):
            t1 = time.perf_counter()
            rep = None if quiet else RichReporter(f"upsample {im.name}")
            out, report = up.upsample(im.pixels, (ow, oh), cfg, rep)
            write_png(target, out)
            info(f"{im.name} ({im.width}x{im.height}) -> {target} ({ow}x{oh}), fit PSNR {report['fit_psnr']:.2f} dB, "
                 f"{time.perf_counter() - t1:.1f} s", quiet)
            results.append({"input": im.name, "path": target, "width": ow, "height": oh, "input_width": im.width,
                            "input_height": im.height, "fit_psnr": report["fit_psnr"], "steps": report["steps"],
                            "seconds": round(time.perf_counter() - t1, 3)})
    if json_out:
        _emit_json({"outputs": results, "config": dataclasses.asdict(cfg) if from_run is None else None,
                    "seconds": round(time.perf_counter() - t0, 3)})


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


def main(argv: Optional[list[str]] = None) -> int:
    """Run the CLI; returns the exit code (used by the console script and the tests)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        rv = app(args=args, prog_name="neurimg", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
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
    except BrokenPipeError:
        return 1
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


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
