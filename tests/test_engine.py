"""The training engine (neurimg.engine): schedule, jitted runner, host loop, hooks, guard."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from neurimg import engine
from neurimg.config import TrainConfig
from neurimg.errors import NeurimgError


def _quadratic_step(tx):
    """Adam on 0.5 |p - 3|^2; batch['scale'] multiplies the target."""

    def step(state, batch):
        target = 3.0 * (1.0 if batch is None else batch["scale"])
        loss, g = jax.value_and_grad(lambda p: 0.5 * jnp.sum(jnp.square(p - target)))(state["p"])
        up, opt = tx.update(g, state["opt"], state["p"])
        return {"p": optax.apply_updates(state["p"], up), "opt": opt}, {"loss": loss}

    return step


def _state(tx, n=4):
    p = jnp.zeros((n,), jnp.float32)
    return {"p": p, "opt": tx.init(p)}


# -- schedule -----------------------------------------------------------------------------------


def test_schedule_values_worked_out_by_hand():
    """peak 1e-3, 1000 steps, 100 warm-up, final 5%: linear to the peak, then
    5e-5 + 9.5e-4 * (1 + cos(pi * (t - 100) / 900)) / 2."""
    lr = engine.schedule(1e-3, 1000, 100, 0.05)
    for t, want in [(0, 0.0), (50, 5e-4), (100, 1e-3), (550, 5.25e-4), (1000, 5e-5), (2000, 5e-5)]:
        assert float(lr(t)) == pytest.approx(want, rel=1e-5, abs=1e-12), t
    short = engine.schedule(1e-3, 10, 50, 0.1)  # warm-up cut to steps - 1
    assert float(short(9)) == pytest.approx(1e-3) and float(short(10)) == pytest.approx(1e-4)


def test_extended_schedule_never_jumps_up_and_ends_at_its_final_value():
    """Resumed at 900 of 1800 with a new total of 3000, then at 2000 with 2500: the rate goes
    on from where it stopped, never rises, and ends at peak * final at each new total."""
    t = TrainConfig(steps=1800, lr=5e-4, warmup_steps=100, final_lr_fraction=0.05)
    base = engine.schedule(t.lr, t.steps, t.warmup_steps, t.final_lr_fraction)
    t2 = t.extended(900, 3000)
    assert t2.steps == 3000 and t2.segments == ((0, 1800), (900, 3000))
    t3 = t2.extended(2000, 2500)
    assert t3.segments == ((0, 1800), (900, 3000), (2000, 2500))
    t3.validate()
    s3 = engine.schedule(t.lr, t3.steps, t.warmup_steps, t.final_lr_fraction, t3.segments)
    lrs = np.array([float(s3(i)) for i in range(0, 2600)])
    np.testing.assert_allclose(lrs[:901], [float(base(i)) for i in range(901)], rtol=1e-6)  # unchanged up to the stop
    assert np.all(np.diff(lrs[100:]) <= 1e-12)  # after the warm-up it only decays
    assert lrs[2500] == pytest.approx(5e-4 * 0.05, rel=1e-5)
    # by hand: half-way through the first new segment, the cosine is at its midpoint
    v0 = float(base(900))
    assert float(s3(1950)) == pytest.approx((v0 + 2.5e-5) / 2, rel=1e-5)


def test_extending_a_finished_run_continues_at_the_final_rate():
    t = TrainConfig(steps=200, lr=1e-3, warmup_steps=10, final_lr_fraction=0.05)
    t2 = t.extended(200, 400)
    s = engine.schedule(t.lr, t2.steps, t.warmup_steps, t.final_lr_fraction, t2.segments)
    assert [float(s(i)) for i in (200, 201, 300, 399)] == pytest.approx([5e-5] * 4, rel=1e-4)
    assert t.extended(50, 200) is t  # the same total: no new segment, the run as planned
    assert TrainConfig(steps=200, warmup_steps=100).extended(40, 500).segments == ()  # still warming up


# -- runner --------------------------------------------------------------------------------------


def test_runner_runs_any_number_of_steps_with_one_trace():
    tx = optax.adam(0.1)
    run = engine.Runner(_quadratic_step(tx))
    before = engine.TRACE_COUNT
    a = _state(tx)
    batches = {"scale": jnp.ones((1,))}
    for n in (1, 5, 17):
        a, out = run(a, batches, n)
        loss = np.asarray(out["loss"])
        assert np.all(np.isfinite(loss[:n])) and np.all(np.isnan(loss[n:])) and bool(out["finite"])
    assert engine.TRACE_COUNT - before == 1
    # 23 steps in three calls == 23 steps in one call
    b, _ = run(_state(tx), batches, 23)
    np.testing.assert_allclose(np.asarray(a["p"]), np.asarray(b["p"]), rtol=1e-6)


def test_runner_steps_through_stacked_batches():
    """Step i trains on batch i % S: with targets 3 * (1, 2) alternating, SGD ends between."""
    tx = optax.sgd(0.5)
    run = engine.Runner(_quadratic_step(tx))
    st, out = run(_state(tx, 1), {"scale": jnp.array([1.0, 2.0])}, 2)
    # step 1: p = 0 + 0.5 * 3 = 1.5; step 2: p = 1.5 + 0.5 * (6 - 1.5) = 3.75
    assert float(st["p"][0]) == pytest.approx(3.75)
    np.testing.assert_allclose(np.asarray(out["loss"])[:2], [4.5, 0.5 * 4.5**2])


def test_runner_reports_a_state_that_is_not_finite_after_the_last_update():
    """The losses are computed before each update: a step whose update makes the weights NaN
    still reports a finite loss. The runner's `finite` catches it."""
    tx = optax.sgd(1.0)

    def step(state, batch):
        new, m = _quadratic_step(tx)(state, batch)  # one SGD step at lr 1 lands on 3 ...
        return {**new, "p": jnp.where(new["p"][0] > 2.9, jnp.nan, new["p"])}, m  # ... made NaN

    run = engine.Runner(step)
    st, out = run(_state(tx, 2), None, 1)
    assert np.isfinite(float(out["loss"][0])) and not bool(out["finite"])


def test_host_loop_gives_the_device_loops_results():
    """loop="host" (n jitted calls, for convolutional steps) returns the same state, metric
    buffers (NaN past n) and `finite` as the device loop, batches cycling alike; a Loop drives it."""
    tx = optax.adam(0.1)
    batches = {"scale": jnp.array([1.0, 2.0, 0.5])}
    dev = engine.Runner(_quadratic_step(tx), donate=False)
    host = engine.Runner(_quadratic_step(tx), donate=False, loop="host")
    s1, o1 = dev(_state(tx), batches, 7)
    s2, o2 = host.compiled(_state(tx), batches)(_state(tx), batches, 7)
    np.testing.assert_allclose(np.asarray(s2["p"]), np.asarray(s1["p"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(o2["loss"]), np.asarray(o1["loss"]), rtol=1e-6)
    assert np.isnan(np.asarray(o2["loss"])[7]) and bool(o2["finite"])
    st, stats = engine.Loop(engine.Runner(_quadratic_step(tx), loop="host"), total=30, batches=lambda s, n: None, chunk_seconds=0.01).run(_state(tx))
    assert stats.steps == 30 and float(jnp.abs(st["p"] - 3).max()) < 0.5
    with pytest.raises(ValueError):
        engine.Runner(_quadratic_step(tx), loop="gpu")


# -- the loop ------------------------------------------------------------------------------------


class Record:
    def __init__(self):
        self.calls = []

    def __call__(self, step, state):
        self.calls.append(step)


def test_loop_hooks_run_at_their_steps_and_bound_the_chunks():
    tx = optax.adam(0.05)
    rows, snaps, ends, seen = Record(), Record(), Record(), []
    loop = engine.Loop(
        engine.Runner(_quadratic_step(tx)),
        total=57,
        hooks=[engine.Every(rows, steps=10, at=(1,), at_end=True), engine.Every(snaps, at=(5, 33)), engine.Every(ends, at_end=True)],
        observe=lambda start, m: seen.append((start, len(m["loss"]))),
    )
    state, stats = loop.run(_state(tx))
    assert rows.calls == [1, 10, 20, 30, 40, 50, 57]
    assert snaps.calls == [5, 33] and ends.calls == [57]
    assert stats.steps == 57 and stats.steps_run == 57
    starts = [s for s, _ in seen]
    assert starts[0] == 0 and sum(n for _, n in seen) == 57
    assert all(a + n == b for (a, n), (b, _) in zip(seen, seen[1:]))  # chunks cover every step once
    assert np.all((np.asarray(state["p"]) > 2.0) & (np.asarray(state["p"]) < 3.0))  # Adam on its way to 3


def test_loop_raises_diverged_and_runs_no_hook_on_a_bad_chunk():
    tx = optax.sgd(1.0)

    def step(state, batch):
        new, m = _quadratic_step(tx)(state, batch)
        return {**new, "p": jnp.where(state["p"][0] >= 3.0, jnp.nan, new["p"])}, m  # step 2 breaks the weights

    saved = Record()
    loop = engine.Loop(engine.Runner(step), total=10, hooks=[engine.Every(saved, steps=1, at_end=True)])
    with pytest.raises(engine.Diverged) as e:
        loop.run(_state(tx, 1))
    assert e.value.exit_code == 1 and e.value.step == 2
    assert saved.calls == [1]  # the NaN state after step 2 never reached a hook


def test_ctrl_c_runs_on_interrupt_then_raises_at_a_chunk_boundary():
    tx = optax.adam(0.05)
    saved = []

    class Rep(engine.NullReporter):
        def update(self, step, loss, psnr, sps):
            if step >= 3:
                os.kill(os.getpid(), signal.SIGINT)

    loop = engine.Loop(engine.Runner(_quadratic_step(tx)), total=100_000, reporter=Rep(),
                       on_interrupt=lambda step, st: saved.append((step, np.asarray(st["p"]).copy())))
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(engine.Interrupted) as e:
        loop.run(_state(tx))
    assert saved and saved[0][0] == e.value.step and 3 <= e.value.step < 100_000, (saved, e.value.step)
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_ctrl_c_while_compiling_is_a_stop_after_the_first_chunk():
    """Ctrl-C during the ahead-of-time compile is not a KeyboardInterrupt inside XLA: it is
    the same flag, so the first chunk runs, `on_interrupt` saves, and `Interrupted` follows."""
    tx = optax.adam(0.05)
    runner = engine.Runner(_quadratic_step(tx))
    real = runner.compiled

    def compiled_with_ctrl_c(state, batches):
        os.kill(os.getpid(), signal.SIGINT)
        return real(state, batches)

    runner.compiled = compiled_with_ctrl_c
    saved = []
    with pytest.raises(engine.Interrupted) as e:
        engine.Loop(runner, total=100, on_interrupt=lambda step, st: saved.append(step)).run(_state(tx))
    assert e.value.step == 1 and saved == [1]


def test_sync_makes_every_process_stop_and_run_hooks_alike():
    """`sync` is the element-wise max over processes: a stop or a due hook on another process
    (simulated here) stops this one or runs its hook at the same step."""
    tx = optax.adam(0.05)
    ran = Record()

    def other_process_says(values):
        v = np.array(values)
        if v[1] == 0:  # the other process's checkpoint timer fired
            v[1] = 1
        return v

    loop = engine.Loop(engine.Runner(_quadratic_step(tx)), total=6, hooks=[engine.Every(ran, at=(6,))], sync=other_process_says)
    loop.run(_state(tx))
    assert ran.calls == sorted(set(ran.calls)) and len(ran.calls) >= 2 and ran.calls[-1] == 6


def test_two_optimizers_alternating_fit_the_engine():
    """A GAN-shaped state (two parameter sets, two optax states, alternating updates) is one
    pure step like any other: a toy min-max game, min_x max_y x*y - y^2/2 + x^2/2, converges to 0."""
    tx_d, tx_g = optax.sgd(0.1), optax.sgd(0.1)

    def step(state, batch):
        x, y = state["g"], state["d"]
        gy = jax.grad(lambda y: -(x * y - 0.5 * y * y))(y)  # the "discriminator" ascends
        up, od = tx_d.update(gy, state["opt_d"])
        y = optax.apply_updates(y, up)
        loss, gx = jax.value_and_grad(lambda x: x * y + 0.5 * x * x)(x)  # the "generator" descends
        up, og = tx_g.update(gx, state["opt_g"])
        return {"g": optax.apply_updates(x, up), "d": y, "opt_g": og, "opt_d": od}, {"loss": loss, "d": y}

    x, y = jnp.float32(1.0), jnp.float32(1.0)
    state = {"g": x, "d": y, "opt_g": tx_g.init(x), "opt_d": tx_d.init(y)}
    st, stats = engine.Loop(engine.Runner(step, ("loss", "d")), total=300).run(state)
    assert abs(float(st["g"])) < 1e-3 and abs(float(st["d"])) < 1e-3 and stats.steps == 300


def test_diverged_is_a_one_line_error():
    e = engine.Diverged(12, float("nan"))
    assert isinstance(e, NeurimgError) and "step 12" in str(e) and "\n" not in str(e)
