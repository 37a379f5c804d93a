"""Devices, processes and the mesh that training runs on.

Data parallelism with `jax.sharding`: a `Mesh` of the chosen devices with two axes,

    "images"  the step's image slots are split along it (each process owns a block of rows),
    "points"  each slot's points are split along it,

of sizes (a, b), a * b = devices. Weights and their optimizer state are replicated on every
device; the per-image tables (latents, their Adam moments) are split by rows over "images"
(`Layout.state_sharding`). Each device computes the gradient of its share of the batch and the
shares are summed (`psum`, see `neurimg.train`). With K image slots per step on D devices of one process,
a = gcd(K, D): a folder of 48 images on 4 devices splits the images (a = 4), one image on 4
devices splits its pixels (b = 4). With several processes, each process's devices hold whole
rows of the "images" axis, so a process only ever sends the devices its own images.

Multi-host: `initialize` starts `jax.distributed` from explicit options or, when none are given,
from the environment (JAX reads SLURM, Open MPI and Cloud TPU settings by itself;
`NEURIMG_COORDINATOR`, `NEURIMG_NUM_PROCESSES` and `NEURIMG_PROCESS_ID` are read here).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from neurimg.errors import NeurimgError

# Per-image rows of the optimizer state (see neurimg.train), split like the latents.
PER_IMAGE_OPT = ("latent_mu", "latent_nu", "latent_count")

ENV_COORDINATOR = "NEURIMG_COORDINATOR"
ENV_NUM_PROCESSES = "NEURIMG_NUM_PROCESSES"
ENV_PROCESS_ID = "NEURIMG_PROCESS_ID"


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v in (None, ""):
        return None
    try:
        return int(v)
    except ValueError:
        raise NeurimgError(f"{name} must be an integer, got {v!r}") from None


def wants_distributed(coordinator=None, num_processes=None, process_id=None) -> bool:
    """Whether options or NEURIMG_* variables ask for a multi-process run."""
    return any(v is not None for v in (coordinator, num_processes, process_id)) or any(
        os.environ.get(k) for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    )


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
) -> bool:
    """Join a multi-process run, if one is asked for. Returns True when distributed.

    Options win over NEURIMG_* variables. Nothing given and no NEURIMG_* variable set: a
    single-process run (JAX's own cluster detection is used only with `coordinator="auto"`)."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if coordinator is None and num_processes is None and process_id is None:
        return False
    if coordinator == "auto":  # SLURM / Open MPI / TPU pods: JAX finds the rest
        coordinator = None
    elif coordinator is None:
        raise NeurimgError("a multi-process run needs --coordinator HOST:PORT (or NEURIMG_COORDINATOR)")
    if coordinator is not None:
        if num_processes is None or process_id is None:
            raise NeurimgError("--coordinator needs --num-processes and --process-id (or their NEURIMG_* variables)")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise NeurimgError(f"--process-id must be in [0, {num_processes}), got {process_id}")
        if ":" not in coordinator:
            raise NeurimgError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s,
        )
    except Exception as e:  # RuntimeError/ValueError/XlaRuntimeError: unreachable, timeout, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NeurimgError(f"could not join the multi-process run via {coordinator or 'auto-detection'}: {msg[:300]}", exit_code=1) from e
    return True


@contextlib.contextmanager
def cluster(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None):
    """Join the multi-process run asked for by the options or NEURIMG_* variables (if any) for
    the duration of the block, and leave it after; yields whether this is the lead process
    (process 0, the one that writes and talks)."""
    distributed = wants_distributed(coordinator, num_processes, process_id)
    with contextlib.ExitStack() as stack:
        if distributed:
            stack.enter_context(native_stdout_to_stderr())
        joined = initialize(coordinator, num_processes, process_id)
        try:
            yield is_lead()
        finally:
            if joined:
                jax.distributed.shutdown()


def is_lead() -> bool:
    return jax.process_index() == 0


def processes() -> tuple[int, int]:
    """(this process's index, the number of processes)."""
    return jax.process_index(), jax.process_count()


def max_over_processes(values: np.ndarray) -> np.ndarray:
    """Element-wise max of an int64 vector over all processes (all must call together)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    every = np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64)))
    return every.reshape(jax.process_count(), -1).max(0)


def all_succeed(fn, what: str):
    """fn() on every process. If it raises a NeurimgError on any, every process stops: that
    one with its own error, the others with one line naming it, instead of waiting forever in
    the next collective."""
    try:
        result, error = fn(), None
    except NeurimgError as e:
        result, error = None, e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        every = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).ravel()
        if error is None and every.any():
            bad = int(np.argmax(every))
            raise NeurimgError(f"process {bad} failed while {what} (its error is on its stderr); stopping")
    if error is not None:
        raise error
    return result


def check_processes_agree(text: str, n_devices: int) -> None:
    """Every process of a run must train the same thing on as many devices; a mismatch would
    otherwise hang in a collective. Compares a digest of `text` (settings, file list) and the
    device count."""
    if jax.process_count() == 1:
        return
    import hashlib

    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int64)
    mine = np.concatenate([digest, [n_devices]]).astype(np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2)
    if len(set(every[:, 1].tolist())) > 1:
        raise NeurimgError(f"every process must use the same number of devices; they use {every[:, 1].tolist()}")
    if len(set(every[:, 0].tolist())) > 1:
        raise NeurimgError(
            "the processes were started with different options or images; start every process with the same command"
        )


def gather_rows(rows: np.ndarray, counts: list[int]) -> np.ndarray:
    """Concatenate every process's rows (process p has counts[p] of them), in process order."""
    if len(counts) == 1:
        return rows
    from jax.experimental import multihost_utils

    most = max(counts)
    mine = np.zeros((most,) + rows.shape[1:], rows.dtype)
    mine[: len(rows)] = rows
    every = np.asarray(multihost_utils.process_allgather(mine))
    return np.concatenate([every[p, : counts[p]] for p in range(len(counts))])


@contextlib.contextmanager
def native_stdout_to_stderr():
    """Send what native code writes to file descriptor 1 (Gloo's connection messages) to stderr
    while keeping Python's `sys.stdout` on the real stdout, which carries data only."""
    sys.stdout.flush()
    saved = os.dup(1)
    old = sys.stdout
    try:
        os.dup2(2, 1)
        sys.stdout = os.fdopen(os.dup(saved), "w", buffering=1)
        yield
    finally:
        try:
            sys.stdout.flush()
            sys.stdout.close()
        finally:
            sys.stdout = old
            os.dup2(saved, 1)
            os.close(saved)


def parse_devices(text: str) -> str | int:
    """'auto' | 'all' | a positive integer (devices of this process)."""
    t = str(text).strip().lower()
    if t in ("auto", "all"):
        return t
    try:
        n = int(t)
    except ValueError:
        n = 0
    if n < 1:
        raise NeurimgError(f"--devices must be a positive integer, 'all' or 'auto', got {text!r}")
    return n


def select_devices(spec: str | int) -> list:
    """This process's devices for training. 'auto': all of them on GPU/TPU, one on CPU (CPU
    'devices' share the same cores, so splitting the batch gains nothing there)."""
    local = jax.local_devices()
    if spec == "all" or (spec == "auto" and local[0].platform != "cpu"):
        return list(local)
    if spec == "auto":
        return local[:1]
    if spec > len(local):
        hint = (
            f"; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count={spec} simulates {spec}"
            if local[0].platform == "cpu"
            else ""
        )
        raise NeurimgError(f"--devices {spec}: this process has only {len(local)} {local[0].platform} device(s){hint}")
    return local[:spec]


@dataclass
class Layout:
    """The mesh and how arrays are placed on it."""

    mesh: Mesh
    process_index: int
    process_count: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.mesh.devices.shape  # (images, points)

    @property
    def num_devices(self) -> int:
        return int(self.mesh.devices.size)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def batch_sharding(self, ndim: int) -> NamedSharding:
        """Stacked batch arrays (steps, slots, points, ...): slots on "images", points on "points"."""
        spec = [None, "images", "points"][:ndim] + [None] * max(0, ndim - 3)
        return NamedSharding(self.mesh, P(*spec))

    def put_replicated(self, tree: Any) -> Any:
        """Host arrays (the same on every process) -> arrays replicated on every device."""
        return self.put(tree, jax.tree.map(lambda _: self.replicated(), tree))

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a stacked batch -> global arrays sharded over the mesh."""
        out = {}
        for k, v in batch.items():
            sh = self.batch_sharding(v.ndim)
            shape = (v.shape[0], v.shape[1] * self.process_count) + v.shape[2:]
            out[k] = jax.make_array_from_process_local_data(sh, v, shape)
        return out

    def put(self, tree: Any, shardings: Any) -> Any:
        """Host arrays (the same on every process) -> global arrays with the given shardings."""

        def put(x, sh):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

        return jax.tree.map(put, tree, shardings)

    def state_sharding(self, state: Any) -> Any:
        """Where the training state lives: the per-image tables (latents and their Adam moments
        and counts, one row per image) split by rows over "images"; the rest replicated.
        Measured (bench/RESULTS.md): against replicated tables, per-device memory falls with
        the number of image rows and the step is no slower. Tables must have a multiple of
        `shape[0]` rows (`pad_rows`)."""
        rows = NamedSharding(self.mesh, P("images"))
        rep = self.replicated()
        out = jax.tree.map(lambda _: rep, state)
        out["params"]["latents"] = rows
        for k in PER_IMAGE_OPT:
            out["opt"][k] = rows
        return out

    def pad_rows(self, n: int) -> int:
        """Rows of the per-image tables for n images: a multiple of the "images" axis."""
        a = self.shape[0]
        return -(-n // a) * a

    def to_host(self, tree: Any) -> Any:
        """Global arrays -> NumPy. Replicated ones are read from this process's copy; split ones
        are gathered, which in a multi-process run every process must do at the same time."""

        def get(a):
            if not isinstance(a, jax.Array):
                return np.asarray(a)
            if a.is_fully_replicated:
                return np.asarray(a.addressable_data(0))
            if a.is_fully_addressable:
                return np.asarray(a)
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(a, tiled=True))

        return jax.tree.map(get, tree)


def make_layout(devices: list, slots_per_process: int) -> Layout:
    """Mesh over every process's `devices` (the same count in each), shaped for
    `slots_per_process` image slots per process and step."""
    nproc, pidx = jax.process_count(), jax.process_index()
    n_local = len(devices)
    if nproc > 1:
        ids = {d.id for d in devices}
        per_process = [[d for d in jax.devices() if d.process_index == p] for p in range(nproc)]
        # every process uses its first n_local devices (checked equal by the collective below)
        chosen = [lst[:n_local] for lst in per_process]
        if any(len(c) < n_local for c in chosen) or not ids <= {d.id for d in chosen[pidx]}:
            raise NeurimgError("every process of a multi-process run must use the same number of devices")
        all_devices = [d for c in chosen for d in c]
    else:
        all_devices = list(devices)
    rows = math.gcd(slots_per_process, n_local)  # image rows per process
    a, b = rows * nproc, n_local // rows
    mesh = Mesh(np.array(all_devices, dtype=object).reshape(a, b), ("images", "points"))
    return Layout(mesh, pidx, nproc)
