"""The one training engine: a pure step over a state, many steps per jitted call, one host loop.

Every command that trains (`fit`, `upsample`, `blend`) supplies only

    step(state, batch) -> (state, metrics)

a pure function: `state` is any pytree of arrays (parameters, optimizer states, a step counter,
an RNG key, ...), `batch` one step's data (a pytree; None where the step draws its own data from
a key in the state), `metrics` a dict of float32 scalars of that step, "loss" among them. Two
optimizers updated in turn (a GAN) are one state and one step like any other.

`Runner` jits it into `run(state, batches, n) -> (state, out)`: n steps in one call
(`lax.fori_loop` with a traced trip count, so one compiled program serves every chunk length);
step i trains on entry i % S of `batches` (pytree leaves stacked along a leading axis of S);
the state is donated (unless a guard needs the state before the chunk, see `Loop`); `out` holds
each metric's per-step values in a buffer of MAX_CHUNK entries (NaN past n) and `finite`,
whether every float leaf of the state after the chunk's last update is finite.

`Loop` is the host side: chunks of about `chunk_seconds` of work (never past a step a hook
wants to see, nor past the end of a guard's window), the finiteness check of the losses and of
the state after every chunk, progress, Ctrl-C and SIGTERM, and hooks (`Every`) for periodic
work: log rows, snapshots, checkpoints. Its guard (`neurimg.guard`, the one failure policy)
judges fixed windows of steps; a bad one is redone from the last good state at a lower rate.

`schedule` is the one learning-rate schedule: linear warm-up, cosine decay, and the decay
segments that extending a run adds (see its docstring).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from neurimg.errors import NeurimgError

# Largest number of steps one jitted call runs; also the length of its metric buffers.
MAX_CHUNK = 1000

# Incremented each time a runner is traced (tests assert one trace per fit).
TRACE_COUNT = 0


# --------------------------------------------------------------------------------------------
# the schedule


def schedule(
    peak: float,
    steps: int,
    warmup: int,
    final_fraction: float,
    segments: Sequence[tuple[int, int]] = (),
) -> Callable[[Any], Any]:
    """lr(step) for the update after `step` updates (what optax passes its schedule).

    The base: linear warm-up from 0 to `peak` over `warmup` steps (at most steps - 1), then
    cosine decay to `peak * final_fraction` at `steps` (optax's warmup_cosine_decay_schedule,
    so runs keep the rates of earlier neurimg versions to the bit).

    Extending a run: `segments` = ((0, T0), (s1, T1), (s2, T2), ...) says the run was planned
    for T0 steps, resumed at step s1 with a new total T1, and so on (`TrainConfig.extended`).
    The base schedule then uses T0, and from each s_k on, the rate decays by a cosine from the
    rate the run had reached at s_k to `peak * final_fraction` at T_k (or stays there, if it was
    already lower). So the rate never jumps up when a run is extended or shortened, and an
    interrupted run resumed with the same total follows the uninterrupted run exactly (no
    segment is added then). Traceable (jnp), also callable with Python ints.
    """
    end_value = peak * final_fraction
    if segments:
        steps = segments[0][1]
    warm = min(warmup, max(steps - 1, 0))
    base = optax.warmup_cosine_decay_schedule(0.0, peak, warm, max(steps, warm + 1), end_value)
    fn = base
    for start, end in segments[1:]:
        fn = _with_segment(fn, int(start), int(end), float(_eval(fn, start)), end_value)
    return fn


def _eval(fn, t):
    with jax.ensure_compile_time_eval():
        return np.asarray(fn(t))


def _with_segment(before, start: int, end: int, v0: float, v1: float):
    lo = min(v0, v1)

    def fn(t):
        tf = jnp.asarray(t, jnp.float32)
        c = jnp.clip((tf - start) / max(end - start, 1), 0.0, 1.0)
        seg = lo + (v0 - lo) * 0.5 * (1.0 + jnp.cos(jnp.pi * c))
        return jnp.where(tf < start, before(t), seg)

    return fn


# --------------------------------------------------------------------------------------------
# the jitted runner


def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    if not leaves:
        return jnp.array(True)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


class Runner:
    """`run(state, batches, n)`: n steps of `step` in one jitted call (see the module docstring);
    `metrics` names the per-step values of `step` kept in the buffers.

    `state_sharding` / `out_sharding`: where the returned state and metric buffers live (a
    device mesh's shardings), or None to let JAX choose. `donate=False` keeps the input state
    alive (needed to redo a chunk)."""

    def __init__(
        self,
        step: Callable,
        metrics: Sequence[str] = ("loss",),
        *,
        donate: bool = True,
        state_sharding: Any = None,
        out_sharding: Any = None,
        loop: str = "device",
    ):
        self.step = step
        self.metrics = tuple(metrics)
        self.donate = donate
        if loop not in ("device", "host"):
            raise ValueError(f"loop must be 'device' or 'host', got {loop!r}")
        self.loop = loop
        self._compiled: dict[Any, Any] = {}  # by the shapes, types and placements of the arguments
        if loop == "host":
            if state_sharding is not None or out_sharding is not None:
                raise ValueError("the host loop runs on one device")
            self._one = jax.jit(step, donate_argnums=0 if donate else ())
            self._finite = jax.jit(_all_finite)
            return

        def run(state, batches, n):
            global TRACE_COUNT
            TRACE_COUNT += 1
            leaves = jax.tree.leaves(batches)
            size = leaves[0].shape[0] if leaves else 1

            def pick(i):
                return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i % size, keepdims=False), batches)

            bufs = {k: jnp.full((MAX_CHUNK,), jnp.nan, jnp.float32) for k in self.metrics}

            def body(i, carry):
                st, bufs = carry
                st, m = step(st, pick(i))
                return st, {k: bufs[k].at[i].set(jnp.asarray(m[k], jnp.float32)) for k in bufs}

            state, bufs = jax.lax.fori_loop(0, n, body, (state, bufs))
            return state, {**bufs, "finite": _all_finite(state)}

        kw: dict[str, Any] = {}
        if state_sharding is not None or out_sharding is not None:
            kw["out_shardings"] = (state_sharding, out_sharding)
        self._run = jax.jit(run, donate_argnums=0 if donate else (), **kw)


    def __call__(self, state, batches, n: int):
        if self.loop == "host":
            return self.compiled(state, batches)(state, batches, n)
        return self._run(state, batches, jnp.int32(n))

    def _host(self, state, batches, n: int, one):
        """The "host" loop: n calls of the jitted step, the same outputs as the device loop.
        XLA's CPU backend runs convolutions inside a while loop ~25x slower than the same
        convolutions in a plain jitted call (bench/RESULTS.md, "GAN blender"), so convolutional
        steps loop here; a step of a tenth of a second or more makes the dispatch negligible.
        The metric buffers are NumPy arrays, filled by one transfer after the n calls (building
        them on the device would compile an update for every chunk length)."""
        leaves = jax.tree.leaves(batches)
        size = leaves[0].shape[0] if leaves else 1
        steps = []
        for i in range(n):
            state, m = one(state, jax.tree.map(lambda a: a[i % size], batches))
            steps.append({k: m[k] for k in self.metrics})
        bufs = {k: np.full((MAX_CHUNK,), np.nan, np.float32) for k in self.metrics}
        for i, m in enumerate(jax.device_get(steps)):
            for k in self.metrics:
                bufs[k][i] = m[k]
        return state, {**bufs, "finite": self._finite(state)}

    def lower(self, state, batches):
        """The jitted program lowered for these shapes (`.compile()` it ahead of time; the
        compiled program takes (state, batches, jnp.int32(n)))."""
        return self._run.lower(state, batches, jnp.int32(1))

    def compiled(self, state, batches) -> Callable:
        """The program compiled ahead of time for the shapes, types and placements of `state`
        and `batches`, kept for the next call with the same ones (a folder of same-sized
        images compiles once): a function (state, batches, n) -> (state, out)."""
        leaves, tree = jax.tree.flatten((state, batches))
        key = (tree, tuple((np.shape(x), jnp.result_type(x), getattr(x, "sharding", None)) for x in leaves))
        if key not in self._compiled:
            if self.loop == "host":  # the step for one step's batch
                one = self._one.lower(state, jax.tree.map(lambda a: a[0], batches)).compile()
                self._compiled[key] = lambda st, b, n: self._host(st, b, int(n), one)
            else:
                exe = self.lower(state, batches).compile()
                self._compiled[key] = lambda st, b, n: exe(st, b, jnp.int32(n))
        return self._compiled[key]


# --------------------------------------------------------------------------------------------
# the host loop


class Reporter(Protocol):
    """Progress (see `neurimg.progress.RichReporter`)."""

    def start(self, total: int, done: int) -> None: ...
    def update(self, step: int, loss: float, psnr: float, steps_per_second: float, detail: str = "") -> None: ...
    def message(self, text: str) -> None: ...
    def stop(self) -> None: ...


class NullReporter:
    def start(self, total, done):
        pass

    def update(self, step, loss, psnr, steps_per_second, detail=""):
        pass

    def message(self, text):
        pass

    def stop(self):
        pass


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: raised once the loop's `on_interrupt` has run (e.g. saved a
    checkpoint). `step` is the step kept; `signum` the signal (the exit code is 128 + it:
    130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, step: int, detail: str = "", signum: int = signal.SIGINT):
        super().__init__(f"interrupted at step {step}" + (f"; {detail}" if detail else ""))
        self.step = step
        self.detail = detail
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Diverged(NeurimgError):
    """A loss or the state after a chunk is not finite (exit code 1)."""

    def __init__(self, step: int, loss: float, what: str = "training"):
        super().__init__(f"{what} diverged at step {step} (loss {loss:.4g}); try a lower --lr", exit_code=1)
        self.step = step
        self.loss = loss


@dataclass
class Every:
    """Periodic work: `fn(step, state)` after the chunk that ends at a step in `at`, at a
    multiple of `steps`, `seconds` after its last run, or (with `at_end`) at the last step.
    Chunks end at every step of `at` and every multiple of `steps`."""

    fn: Callable[[int, Any], None]
    steps: int = 0
    at: Sequence[int] = ()
    seconds: float = 0.0
    at_end: bool = False
    _last: float = field(default_factory=time.perf_counter, repr=False)

    def next_step(self, step: int) -> Optional[int]:
        nxt = [s for s in self.at if s > step]
        if self.steps:
            nxt.append((step // self.steps + 1) * self.steps)
        return min(nxt) if nxt else None

    def at_step(self, step: int, total: int) -> bool:
        """Due by its steps alone (`at`, `steps`, `at_end`)."""
        return step in self.at or (self.steps > 0 and step % self.steps == 0) or (self.at_end and step == total)

    def due(self, step: int, total: int) -> bool:
        return self.at_step(step, total) or (self.seconds > 0 and time.perf_counter() - self._last >= self.seconds)

    def __call__(self, step: int, state) -> None:
        self.fn(step, state)
        self._last = time.perf_counter()


@dataclass
class LoopStats:
    steps: int  # the step reached
    steps_run: int  # steps run by this loop (redone ones not counted)
    train_seconds: float  # time in step calls (compile excluded)
    compile_seconds: float  # compiling the program ahead of the first call
    redone: int = 0  # chunks redone by the guard
    steps_timed: int = 0  # steps (redone ones included) in `train_seconds`

    @property
    def steps_per_second(self) -> float:
        """Steady state: compile excluded."""
        return self.steps_timed / self.train_seconds if self.train_seconds > 0 else 0.0


class _SigintFlag:
    """Turn Ctrl-C (SIGINT) and SIGTERM (what schedulers send first) into a flag checked between
    jitted calls (the call itself is not interrupted); `signum` says which came."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.hit = False
        self.signum = signal.SIGINT
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.hit:  # a second signal: give up immediately
            raise KeyboardInterrupt
        self.hit = True
        self.signum = signum

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def _no_sync(values: np.ndarray) -> np.ndarray:
    return values


def lr_scaled(step: Callable, keys: Sequence[str] = ("params",)) -> Callable:
    """`step` with the change it makes to each subtree `keys` of the state multiplied by
    state["lr_scale"] (a float32 scalar the guard lowers on a rollback, see `neurimg.guard`).
    For Adam (whose moments do not depend on the rate) this is exactly a learning rate x
    lr_scale; at lr_scale 1 the step's result is kept to the bit."""

    def scaled(state, batch):
        new, metrics = step(state, batch)
        s = state["lr_scale"]

        def mix(old, upd):
            if not jnp.issubdtype(upd.dtype, jnp.floating):
                return upd
            return jnp.where(s == 1, upd, old + (s * (upd - old)).astype(upd.dtype))

        return {**new, **{k: jax.tree.map(mix, state[k], new[k]) for k in keys}, "lr_scale": s}, metrics

    return scaled


def lower_lr(state, factor: float):
    """The state with its "lr_scale" multiplied by `factor`, placed as it was."""
    old = state["lr_scale"]
    new = np.float32(np.asarray(jax.device_get(old)) * factor)
    sharding = getattr(old, "sharding", None)
    return {**state, "lr_scale": jax.device_put(new, sharding) if sharding is not None else jnp.float32(new)}


# Fixed steps per jitted call, for tests that check decisions do not depend on it (None: the
# length follows the measured speed, `Loop.chunk_seconds`).
CHUNK_STEPS: int | None = None


@dataclass
class _Done:
    """A run chunk of the window being judged: steps start+1 .. start+n; `state` after it
    (kept only where a hook may want it)."""

    start: int
    n: int
    metrics: dict[str, np.ndarray]
    state: Any


@dataclass
class Loop:
    """Run `runner` from `start` to `total` steps (see the module docstring).

    batches(first, n)  the device batches for steps first+1 .. first+n (called while the
                       previous chunk runs), or None for steps that draw their own data
    max_steps          most steps per call (e.g. the number of stacked batches)
    hooks              `Every` instances, run in order after each accepted chunk
    observe(start, metrics)  sees every accepted chunk's per-step metrics (host arrays)
    guard              a `neurimg.guard.Guard`: windows of steps are judged, a bad one is redone
                       from the state before it with a lower lr (the state holds "lr_scale",
                       the step is `lr_scaled`, the runner keeps its input: donate=False), and a
                       failed attempt raises `neurimg.guard.TrainingFailed`. Chunks end at
                       every window end; observe and hooks see a window's chunks once it is
                       accepted, in step order, so loss.csv and checkpoints hold judged steps only.
    on_interrupt(step, state)  runs on Ctrl-C or SIGTERM (with the last accepted state) before
                       `Interrupted` is raised
    sync(values)       element-wise max of an int64 vector over all processes (identity for
                       one): stop, hook flags and the next chunk length agree everywhere
    describe(metrics)  more to show with the progress (e.g. "D 1.38 p 0.02") from the last
                       chunk's per-step metrics, passed to the reporter's update as `detail`
    Progress shows the step's "loss" and its "psnr" metric (else 10 log10(1 / loss)).
    """

    runner: Runner
    total: int
    start: int = 0
    batches: Callable[[int, int], Any] = lambda first, n: None
    max_steps: int = MAX_CHUNK
    hooks: Sequence[Every] = ()
    observe: Optional[Callable[[int, dict[str, np.ndarray]], None]] = None
    guard: Any = None
    on_interrupt: Optional[Callable[[int, Any], None]] = None
    describe: Optional[Callable[[dict[str, np.ndarray]], str]] = None
    reporter: Any = None
    sync: Callable[[np.ndarray], np.ndarray] = _no_sync
    chunk_seconds: float = 1.0
    to_host: Callable[[Any], Any] = jax.device_get
    what: str = "training"
    stats: LoopStats | None = None  # set by `run`

    def _length(self, at: int, sps: float | None) -> int:
        n = min(self.total - at, self.max_steps, MAX_CHUNK)
        for h in self.hooks:
            nxt = h.next_step(at)
            if nxt is not None:
                n = min(n, nxt - at)
        if self.guard is not None:
            n = min(n, self.guard.boundary(at, self.total) - at)
        if CHUNK_STEPS is not None:
            return max(1, min(n, CHUNK_STEPS))
        if sps is None:
            return 1  # the speed is not known yet: a short first call
        return max(1, min(n, int(sps * self.chunk_seconds)))

    def _window_end(self, start: int, end: int) -> bool:
        return self.guard is None or end == self.guard.boundary(start, self.total)

    def run(self, state) -> tuple[Any, LoopStats]:
        from neurimg.guard import ROLLBACK_LR_FACTOR, TrainingFailed

        if self.guard is not None and self.runner.donate:
            raise ValueError("a guard needs a runner that keeps its input state (donate=False)")
        if self.guard is not None and "lr_scale" not in state:
            raise ValueError("a guarded state holds its lr_scale (see lr_scaled)")
        rep = self.reporter or NullReporter()
        stats = self.stats = LoopStats(self.start, 0, 0.0, 0.0)  # hooks may read the running figures
        step = self.start
        if step >= self.total:
            return state, stats
        good, good_step = state, step  # the last committed state (see `neurimg.guard`)
        held: list[_Done] = []  # the chunks of the window judged good, committed after the next
        held_timed: list[bool] = []  # the timed hooks due at its end
        pending: list[_Done] = []  # the chunks of the window being run
        agreed_sps: float | None = None
        n = self._length(step, None)
        batches = self.batches(step, n)

        def commit(chunks: list[_Done], timed: list[bool]) -> None:
            """Observe and hooks for judged chunks, in step order."""
            for i, d in enumerate(chunks):
                end = d.start + d.n
                stats.steps, stats.steps_run = end, stats.steps_run + d.n
                if self.observe is not None:
                    self.observe(d.start, d.metrics)
                last = i == len(chunks) - 1
                for h, t in zip(self.hooks, timed):  # this chunk's work first, so a stop loses none
                    if h.at_step(end, self.total) or (last and t):
                        h(end, d.state)

        def stop_now(sigint) -> None:
            rep.stop()
            if self.on_interrupt is not None:
                self.on_interrupt(good_step, good)
            raise Interrupted(good_step, signum=sigint.signum)

        try:
            with _SigintFlag() as sigint:  # from here on (compile included) a signal is a flag
                t0 = time.perf_counter()
                run = self.runner.compiled(state, batches)
                stats.compile_seconds = time.perf_counter() - t0
                rep.start(self.total, step)
                while good_step < self.total:
                    t_call = time.perf_counter()
                    new_state, out = run(state, batches, n)  # runs asynchronously ...
                    after = step + n
                    n_next = self._length(after, agreed_sps) if after < self.total else 0
                    next_batches = self.batches(after, n_next) if n_next else None  # ... while these are drawn
                    host = self.to_host(out)  # one transfer: the metric buffers and `finite`
                    metrics = {k: np.asarray(v)[:n] for k, v in host.items() if k != "finite"}
                    finite = bool(host["finite"]) and all(np.all(np.isfinite(v)) for v in metrics.values())
                    stats.train_seconds += time.perf_counter() - t_call
                    stats.steps_timed += n
                    ends = self._window_end(step, after)
                    wanted = ends or any(h.at_step(after, self.total) for h in self.hooks)
                    pending.append(_Done(step, n, metrics, new_state if wanted else None))
                    sps = stats.steps_per_second or None
                    if finite:
                        loss_last = float(metrics["loss"][-1]) if "loss" in metrics else float("nan")
                        psnr_last = float(metrics["psnr"][-1]) if "psnr" in metrics else _psnr(loss_last)
                        if self.describe is None:
                            rep.update(after, loss_last, psnr_last, sps or 0.0)
                        else:
                            rep.update(after, loss_last, psnr_last, sps or 0.0, detail=self.describe(metrics))
                    # Every process must take the same decisions: stop, hooks, next length.
                    flags = [int(sigint.hit)] + [int(ends and h.seconds > 0 and h.due(after, self.total)) for h in self.hooks]  # timed hooks
                    local_sps = int(1000 * sps) if sps else 0
                    agreed = self.sync(np.array(flags + [-local_sps], np.int64))
                    stop, timed = bool(agreed[0]), [bool(v) for v in agreed[1 : 1 + len(self.hooks)]]
                    agreed_sps = -int(agreed[-1]) / 1000 if agreed[-1] < 0 else None
                    if self.guard is None:
                        if not finite:
                            loss = metrics.get("loss", np.array([np.nan]))
                            bad = int(np.argmax(~np.isfinite(loss))) if not np.all(np.isfinite(loss)) else n - 1
                            raise Diverged(step + bad + 1, float(loss[bad]), self.what)
                        commit(pending, timed)
                        good, good_step, pending = new_state, after, []
                        if stop:
                            stop_now(sigint)
                    elif ends or not finite:
                        for d in pending:
                            self.guard.see(d.metrics)
                        verdict = self.guard.judge(after, self.total, finite)
                        if verdict.action == "fail":
                            raise TrainingFailed(verdict.reason, self.guard.policy.hint)
                        if verdict.action == "rollback":  # redo from the last committed state, slower
                            rep.message(f"{self.what}: {verdict.reason}; redoing steps {good_step + 1}-{self.guard.boundary(pending[-1].start, self.total)} "
                                        f"with the lr x {ROLLBACK_LR_FACTOR:g} (rollback {self.guard.rollbacks})")
                            state, step, pending, held = lower_lr(good, ROLLBACK_LR_FACTOR), good_step, [], []
                            self.guard.discard()
                            stats.redone += 1
                            n = self._length(step, agreed_sps)
                            batches = self.batches(step, n)
                            continue
                        # judged good: the window before it is committed, this one held (the
                        # last one is committed at once)
                        if held:
                            commit(held, held_timed)
                            good, good_step = held[-1].state, held[-1].start + held[-1].n
                        held, held_timed, pending = pending, timed, []
                        if after == self.total or stop:
                            commit(held, held_timed)
                            good, good_step, held = new_state, after, []
                        if stop:
                            stop_now(sigint)
                    elif stop:  # a signal inside a window: the held window (judged good) is kept
                        if held:
                            commit(held, held_timed)
                            good, good_step, held = held[-1].state, held[-1].start + held[-1].n, []
                        stop_now(sigint)
                    state, step = new_state, after
                    # n_next was chosen from the speed agreed after the previous chunk: the
                    # same on every process
                    n, batches = n_next, next_batches
        finally:
            rep.stop()
        return good, stats


def _psnr(mse: float) -> float:
    return float(-10 * np.log10(max(mse, 1e-12))) if math.isfinite(mse) else float("nan")
