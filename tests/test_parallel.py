"""Data-parallel training over several devices and several processes (CPU stand-ins).

`XLA_FLAGS=--xla_force_host_platform_device_count=4` splits the CPU into 4 JAX devices; it must
be set before JAX starts, so these tests run their fits in fresh Python processes.
"""

import csv
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from neurimg import checkpoint as ckpt

from conftest import err_of

TINY = ["--width", "32", "--hidden-layers", "2", "--latent-dim", "16", "--lr", "2e-3", "--latent-lr", "2e-2",
        "--snapshots", "none", "--log-every", "5", "-q", "--json"]



# Gloo's connection message, "[Gloo] Rank R is connected to N peer ranks. Expected number of
# connected peer ranks is : N", comes from native code in pieces; two processes' (or threads')
# pieces interleave at times, on one line or across two, so it is removed piece by piece.
GLOO_PIECES = re.compile(r"\[Gloo\] Rank |\d*\s?is connected to\s?\d*|\d*\s?peer ranks\. Expected number of connected peer ranks is : \d*")


def _without_gloo(err: str) -> list[str]:
    """stderr's lines without Gloo's connection messages however they interleave (seen: "[Gloo]
    Rank [Gloo] Rank 1 is connected ...", then "1 is connected ..." on the next line; and "[Gloo]
    Rank 0 is connected to [Gloo] Rank 0 is connected to 1 peer ranks. ...", then "1 peer ranks.
    ..."): what is left of a line once they are removed, if anything but digits."""
    left = (GLOO_PIECES.sub("", ln).strip() for ln in err.splitlines())
    return [ln for ln in left if ln and not ln.isdigit()]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.pop("NEURIMG_COORDINATOR", None)
    return env


def _fits(runs: list[list[str]], devices: int = 4, timeout: int = 600) -> list[dict]:
    """Run several `neurimg ...` commands in one fresh Python with `devices` CPU devices."""
    code = (
        "import json, sys\n"
        "from neurimg.cli import main\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    assert main(args) == 0, args\n"
    )
    p = subprocess.run([sys.executable, "-c", code, json.dumps(runs)], env=_env(devices), capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line) for line in p.stdout.splitlines()]


def _losses(run) -> np.ndarray:
    rows = list(csv.reader(open(os.path.join(run, "loss.csv"))))[1:]
    return np.array([[float(r[0]), float(r[1]), float(r[2])] for r in rows])


@pytest.mark.learned
def test_one_three_and_four_devices_train_alike(tmp_path, logos4):
    """The same steps on 1, 3 and 4 devices give the same losses (tolerance 1e-4 relative: only
    the order of the gradient sums differs), both when a step's images are split over the
    devices (4 images: mesh 4x1) and when one image's pixels are (mesh 1x4, full batch), when
    the split does not divide evenly (4 images, 3 devices: mesh 1x3, points padded), and when
    the per-image tables split over 2 devices need a padding row (3 images, 2 per step)."""
    one = str(sorted(logos4.iterdir())[0])
    runs, cmds = {}, []
    for d in (1, 3, 4):
        runs[("minibatch", d)] = str(tmp_path / f"mb{d}")
        cmds.append(["fit", str(logos4), "-o", runs[("minibatch", d)], "--steps", "40", "--devices", str(d), *TINY])
    three = tmp_path / "three"  # 3 images, 2 a step, on 2 devices: mesh 2x1, a padding table row
    three.mkdir()
    for f in sorted(logos4.iterdir())[:3]:
        (three / f.name).write_bytes(f.read_bytes())
    for d in (1, 2):
        runs[("subset", d)] = str(tmp_path / f"sub{d}")
        cmds.append(["fit", str(three), "-o", runs[("subset", d)], "--steps", "30", "--batch-images", "2", "--devices", str(d), *TINY])
    for d in (1, 4):
        runs[("full", d)] = str(tmp_path / f"full{d}")
        cmds.append(["fit", one, "-o", runs[("full", d)], "--steps", "30", "--batch-pixels", "all", "--devices", str(d), *TINY])
    out = _fits(cmds)
    assert [o["devices"] for o in out] == [1, 3, 4, 1, 2, 1, 4]
    for kind, ds in (("minibatch", (3, 4)), ("subset", (2,)), ("full", (4,))):
        ref = _losses(runs[(kind, 1)])
        assert ref[-1, 1] < 0.6 * ref[0, 1]  # it trained
        for d in ds:
            got = _losses(runs[(kind, d)])
            np.testing.assert_array_equal(got[:, 0], ref[:, 0])
            np.testing.assert_allclose(got[:, 1:], ref[:, 1:], rtol=1e-4, err_msg=f"{kind} on {d} devices")
    assert out[1]["mean_psnr"] == pytest.approx(out[0]["mean_psnr"], abs=1e-3)


def test_resume_on_another_number_of_devices(tmp_path, logos4):
    """30 steps on 1 device, then resumed to 60 on 4 devices == resumed to 60 on 1 device
    (checkpoint and resume do not depend on the devices)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _fits([
        ["fit", str(logos4), "-o", a, "--steps", "30", "--devices", "1", *TINY],
        ["fit", str(logos4), "-o", b, "--steps", "30", "--devices", "1", *TINY],
        ["fit", "--resume", "-o", a, "--steps", "60", "--devices", "1", "-q", "--json"],
        ["fit", "--resume", "-o", b, "--steps", "60", "--devices", "4", "-q", "--json"],
    ])
    assert ckpt.load(b).step == 60
    np.testing.assert_allclose(_losses(b)[:, 1:], _losses(a)[:, 1:], rtol=1e-4)
    ta, tb = ckpt.load(a).tensors, ckpt.load(b).tensors
    for k in ta:
        if k.startswith("params"):
            np.testing.assert_allclose(tb[k], ta[k], rtol=1e-3, atol=1e-5, err_msg=k)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.learned
def test_two_processes_on_one_machine(tmp_path, logos4, capsys):
    """Two processes (2 CPU devices each) join through jax.distributed on 127.0.0.1, each reads
    half of the images, and together they write one run: process 0 alone prints and writes.
    The run then continues in a single process."""
    from conftest import run_cli

    run = str(tmp_path / "run")
    port = _free_port()
    procs = []
    for pid in (0, 1):
        env = _env(2)
        env.update(NEURIMG_COORDINATOR=f"127.0.0.1:{port}", NEURIMG_NUM_PROCESSES="2", NEURIMG_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "neurimg.cli", "fit", str(logos4), "-o", run, "--steps", "40", "--devices", "2", *TINY],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    summary = json.loads(outs[0][0])
    assert outs[1][0] == ""  # process 1 prints nothing on stdout
    assert summary["processes"] == 2 and summary["devices"] == 4 and summary["images"] == 4
    stored = ckpt.load(run)
    assert stored.step == 40 and [i.name for i in stored.images] == sorted(p.name for p in logos4.iterdir())
    m = json.loads(open(os.path.join(run, "metrics.json")).read())
    assert len(m["images"]) == 4 and all(i["psnr"] > 8 for i in m["images"])
    losses = _losses(run)
    assert losses[-1, 1] < 0.6 * losses[0, 1]
    # one process, one device, goes on from there
    code, out, err = run_cli(capsys, "fit", "--resume", "-o", run, "--steps", "50", "-q", "--json")
    assert code == 0, err
    assert json.loads(out)["resumed_from"] == 40 and ckpt.load(run).step == 50


def _start_pair(run, port, steps, extra=()):
    procs = []
    for pid in (0, 1):
        env = _env(2)
        env.update(NEURIMG_COORDINATOR=f"127.0.0.1:{port}", NEURIMG_NUM_PROCESSES="2", NEURIMG_PROCESS_ID=str(pid),
                   PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "neurimg.cli", "fit", *extra, "-o", run, "--steps", str(steps), "--devices", "2", *TINY],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    return procs


def test_ctrl_c_on_one_process_stops_both_with_a_checkpoint(tmp_path, logos4):
    """Ctrl-C reaching only process 1 stops both processes at the same step: process 0 saves
    the checkpoint, both exit 130, and nothing hangs in a collective."""
    import signal
    import time

    run = str(tmp_path / "run")
    procs = _start_pair(run, _free_port(), 100000, [str(logos4), "--checkpoint-every", "0.5"])
    try:
        # signalled once a judged step is checkpointed (the guard commits windows of 25 steps):
        # then a stop keeps a step > 0 however slow the machine is
        deadline = time.time() + 180
        while time.time() < deadline and not (os.path.exists(os.path.join(run, "checkpoint.safetensors")) and ckpt.load(run).step > 0):
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGINT)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [130, 130], [o[1][-2000:] for o in outs]
    assert outs[0][0] == "" and outs[1][0] == ""  # --json prints no summary for an interrupted run
    step = ckpt.load(run).step
    assert step > 0 and _losses(run)[-1, 0] <= step


def test_processes_started_differently_stop_with_an_error(tmp_path, logos4):
    """A process started with other options fails at once (exit 2, one line), instead of
    hanging in a collective."""
    run = str(tmp_path / "run")
    port = _free_port()
    procs = []
    for pid, steps in ((0, "20"), (1, "30")):
        env = _env(1)
        env.update(NEURIMG_COORDINATOR=f"127.0.0.1:{port}", NEURIMG_NUM_PROCESSES="2", NEURIMG_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "neurimg.cli", "fit", str(logos4), "-o", run, "--steps", steps, *TINY],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 2, err[-2000:]
        lines = _without_gloo(err)
        assert lines == ["neurimg: error: the processes were started with different options or images; "
                         "start every process with the same command"], err[-2000:]
        assert out == ""


def test_a_process_that_cannot_read_its_images_stops_both(tmp_path, logos4):
    """Process 1's share holds a damaged file: it stops with that file's error and process 0,
    which read its share, stops too with one line naming process 1, instead of waiting forever
    in the next collective. Nothing is trained or written."""
    d = tmp_path / "imgs"
    d.mkdir()
    files = sorted(logos4.iterdir())
    for f in files:
        (d / f.name).write_bytes(f.read_bytes())
    (d / files[-1].name).write_bytes(files[-1].read_bytes()[:80])  # the last file: process 1's share
    run = str(tmp_path / "run")
    procs = _start_pair(run, _free_port(), 20, extra=[str(d)])
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    errors = []
    for p, (out, err) in zip(procs, outs):
        lines = _without_gloo(err)
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("neurimg: error:"), err[-2000:]
        assert out == ""
        errors.append(lines[0])
    assert "process 1 failed while reading its images" in errors[0]
    assert files[-1].name in errors[1]
    assert not os.path.exists(os.path.join(run, "checkpoint.safetensors"))


def test_device_and_cluster_option_errors(capsys, tmp_path, logos4):
    out = str(tmp_path / "r")
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=64" in err_of(capsys, "fit", logos4, "-o", out, "--devices", "64")
    assert "--devices must be" in err_of(capsys, "fit", logos4, "-o", out, "--devices", "0")
    assert "--devices must be" in err_of(capsys, "fit", logos4, "-o", out, "--devices", "many")
    assert "--num-processes" in err_of(capsys, "fit", logos4, "-o", out, "--coordinator", "127.0.0.1:1234")
    assert "--process-id must be in [0, 2)" in err_of(
        capsys, "fit", logos4, "-o", out, "--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"
    )
    assert "HOST:PORT" in err_of(capsys, "fit", logos4, "-o", out, "--coordinator", "localhost", "--num-processes", "2", "--process-id", "0")
    assert "--coordinator" in err_of(capsys, "fit", logos4, "-o", out, "--num-processes", "2", "--process-id", "0")
    assert "--batch-images must be" in err_of(capsys, "fit", logos4, "-o", out, "--batch-images", "-3")
    assert "--workers must be" in err_of(capsys, "fit", logos4, "-o", out, "--workers", "0")
