"""The one failure policy (neurimg.guard) through the engine's Loop: fixed windows by step
index, rollbacks with a lower lr, failures, and decisions that do not depend on chunking."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from neurimg import engine, guard


def _sgd_step(lr: float):
    """Gradient descent on p^2 (curvature 2): each step multiplies p by (1 - 2 lr s), s the
    guard's lr_scale, so lr > 1 diverges (|1 - 2 lr| > 1) and half of 1.2 converges."""

    def step(state, batch):
        p = state["p"]
        loss = jnp.sum(p * p)
        return {**state, "p": p - lr * 2 * p}, {"loss": loss}

    return engine.lr_scaled(step, ("p",))


def _run(lr, total, chunk, policy, hooks=(), start_p=1.0):
    engine.CHUNK_STEPS = chunk
    try:
        seen = []
        watch = guard.Guard(policy)
        loop = engine.Loop(engine.Runner(_sgd_step(lr), donate=False), total=total, guard=watch,
                           observe=lambda s, m: seen.append((s, m["loss"].copy())), hooks=hooks)
        state = {"p": jnp.full((2,), start_p, jnp.float32), "lr_scale": jnp.float32(1.0)}
        st, stats = loop.run(state)
        return st, stats, watch, seen
    finally:
        engine.CHUNK_STEPS = None


def _flat(seen):
    """The observed per-step losses by step (an observation per step, in order)."""
    steps = [s + 1 + i for s, m in seen for i in range(len(m))]
    assert steps == list(range(steps[0], steps[0] + len(steps))), "observe saw steps out of order or twice"
    return np.concatenate([m for _, m in seen])


def test_a_collapse_is_rolled_back_to_the_window_start_with_a_lower_lr():
    # lr 1.2 grows |p| by 1.4x a step: window 2 (steps 26-50) is far above window 1's mean
    st, stats, watch, seen = _run(1.2, 100, None, guard.Policy(warmup=0, window=25, collapse_factor=10))
    assert watch.rollbacks >= 1 and stats.redone == watch.rollbacks and stats.steps == 100
    assert float(st["lr_scale"]) == guard.ROLLBACK_LR_FACTOR ** watch.rollbacks
    losses = _flat(seen)
    assert len(losses) == 100  # each accepted step observed once; the rejected windows never
    # after the rollback (lr 0.6: p x -0.2 a step) the loss falls to nothing
    assert losses[-1] < 1e-20 and np.all(np.isfinite(losses))


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_decisions_and_observations_do_not_depend_on_the_chunk_length(chunk):
    ref = _run(1.2, 120, 1000, guard.Policy(warmup=0, window=25))
    got = _run(1.2, 120, chunk, guard.Policy(warmup=0, window=25))
    assert got[2].rollbacks == ref[2].rollbacks >= 1
    np.testing.assert_array_equal(_flat(got[3]), _flat(ref[3]))
    np.testing.assert_array_equal(np.asarray(got[0]["p"]), np.asarray(ref[0]["p"]))


def test_rollbacks_run_out_into_a_failure():
    # lr 3 diverges at every rate the rollbacks reach within MAX_ROLLBACKS (3 x 0.5^4 = 0.19 still
    # shrinks... so start it at 40: 40 x 0.5^4 = 2.5 > 1 diverges)
    with pytest.raises(guard.TrainingFailed, match="rollbacks"):
        _run(40.0, 200, None, guard.Policy(warmup=0, window=25))


def test_a_nan_is_rolled_back_like_a_collapse():
    # p = 1e20: p^2 overflows float32 from the first step: not finite in window 1, every try
    with pytest.raises(guard.TrainingFailed, match="not finite"):
        _run(0.1, 50, None, guard.Policy(warmup=0, window=25), start_p=1e20)


def test_not_learning_fails_past_the_set_fraction_and_not_before():
    # lr 0: the loss stays at 2 (p = 1, 1); trivial 1.5: no better past half of the steps
    policy = guard.Policy(warmup=0, window=25, trivial=1.5, learn_after=0.5)
    with pytest.raises(guard.TrainingFailed, match="not learning: at step 50"):
        _run(0.0, 100, None, policy)
    # the same run judged against a trivial answer it beats (2 < 3) finishes
    _, stats, _, _ = _run(0.0, 100, None, guard.Policy(warmup=0, window=25, trivial=3.0))
    assert stats.steps == 100


def test_guard_unit_windows():
    g = guard.Guard(guard.Policy(warmup=30, window=10, collapse_factor=10))
    for end, value in [(10, 1.0), (20, 0.5), (30, 6.0)]:  # a jump inside the warm-up is not judged
        g.see({"loss": np.full(10, value)})
        assert g.judge(end, 100, True).action == "ok"
    g.see({"loss": np.full(10, 5.1)})  # 5.1 > 10 x 0.5: a collapse after the warm-up
    v = g.judge(40, 100, True)
    assert v.action == "rollback" and "collapsed by step 40" in v.reason
    g.see({"loss": np.full(10, 4e-7)})
    assert g.judge(40, 100, True).action == "ok"
    g.see({"loss": np.full(10, 9e-7)})  # 2x its best, but below the floor: noise, not a collapse
    assert g.judge(50, 100, True).action == "ok"
    assert g.boundary(0, 100) == 10 and g.boundary(9, 100) == 10 and g.boundary(10, 100) == 20 and g.boundary(95, 97) == 97


def test_a_trivial_answer_given_as_a_metric_is_averaged_over_the_window():
    g = guard.Guard(guard.Policy(window=4, trivial="base", learn_after=0.0))
    g.see({"loss": np.array([1.0, 1.0]), "base": np.array([0.5, 2.0])})
    g.see({"loss": np.array([1.0, 1.0]), "base": np.array([1.0, 1.0])})  # mean base 1.125 > 1: learning
    assert g.judge(4, 8, True).action == "ok"
    g.see({"loss": np.ones(4), "base": np.full(4, 0.9)})
    assert g.judge(8, 8, True).action == "fail"


def test_attempts_start_again_with_lower_rates_then_fail_with_one_line():
    calls = []

    def run(k, factor):
        calls.append((k, factor))
        raise guard.TrainingFailed(f"attempt {k} failed")

    tally = guard.Tally()
    with pytest.raises(guard.TrainingFailed) as e:
        guard.attempts(run, tally=tally)
    assert calls == [(0, 1.0), (1, 0.5), (2, 0.25)] and tally.restarts == guard.MAX_RESTARTS
    assert "after 2 restarts" in e.value.message and "\n" not in e.value.message and e.value.exit_code == 1
    calls.clear()
    with pytest.raises(guard.TrainingFailed):
        guard.attempts(lambda k, f: run(k, f), max_restarts=0)
    assert calls == [(0, 1.0)]
    assert guard.attempts(lambda k, f: k if k == 1 else run(k, f)) == 1


def test_lr_scaled_keeps_the_step_to_the_bit_at_scale_one():
    step = _sgd_step(0.3)
    state = {"p": jnp.array([0.7, -1.3], jnp.float32), "lr_scale": jnp.float32(1.0)}
    new, _ = step(state, None)
    np.testing.assert_array_equal(np.asarray(new["p"]), np.asarray(state["p"] - 0.3 * 2 * state["p"]))
    half, _ = step({**state, "lr_scale": jnp.float32(0.5)}, None)
    np.testing.assert_allclose(np.asarray(half["p"]), np.asarray(state["p"] - 0.15 * 2 * state["p"]), rtol=1e-6)


def test_a_fall_back_to_the_trivial_answer_is_a_collapse_even_below_the_factor():
    """Best 0.4 x the trivial answer, then back at it (2.5x the best, under the factor 10):
    the attempt fails at once (a fresh start follows), not left to the not-learning check at
    half of the steps, nor rolled back into a window that is part of the fall."""
    g = guard.Guard(guard.Policy(warmup=0, window=10, trivial=1.0))
    g.see({"loss": np.full(10, 0.4)})
    assert g.judge(10, 1000, True).action == "ok"
    g.see({"loss": np.full(10, 1.0)})
    v = g.judge(20, 1000, True)
    assert v.action == "fail" and "back at the trivial answer" in v.reason
    g2 = guard.Guard(guard.Policy(warmup=0, window=10, trivial=1.0))  # never below half: not learning yet, no verdict
    g2.see({"loss": np.full(10, 0.6)})
    g2.judge(10, 1000, True)
    g2.see({"loss": np.full(10, 1.0)})
    assert g2.judge(20, 1000, True).action == "ok"


def test_a_climb_above_twice_the_best_for_several_windows_is_a_collapse():
    """A slow climb away from the best (under the factor 10, never back at the trivial answer),
    here with regress_windows 4 (the default is 8): up to three windows in a row above 2x the
    best are let be (a bump that passes), a fourth is rolled back, from before the one before
    it; a window back under 2x resets the count, and so does the rollback."""
    assert guard.Policy().regress_factor == 2.0 and guard.Policy().regress_windows == 8
    g = guard.Guard(guard.Policy(warmup=0, window=10, trivial=10.0, regress_windows=4))
    steps = [(10, 1.0, "ok"), (20, 0.5, "ok"), (30, 1.2, "ok"), (40, 1.1, "ok"), (50, 1.3, "ok"), (60, 0.9, "ok"),
             (70, 1.1, "ok"), (80, 1.2, "ok"), (90, 1.3, "ok"), (100, 1.4, "rollback")]
    for end, value, action in steps:
        g.see({"loss": np.full(10, value)})
        v = g.judge(end, 1000, True)
        assert v.action == action, (end, v)
    assert "above 2x its best for 4 windows" in v.reason and "2.8x now" in v.reason
    assert g.held is None and g.regressed == 0  # the held window (90) is redone too
    for end in (90, 100, 110):  # redone, still above 2x: counted from the start again
        g.see({"loss": np.full(10, 1.05)})
        assert g.judge(end, 1000, True).action == "ok"
    g.see({"loss": np.full(10, 1.05)})
    assert g.judge(120, 1000, True).action == "rollback"
    off = guard.Guard(guard.Policy(warmup=0, window=10, trivial=10.0, regress_factor=math.inf))
    for end, value in [(10, 0.5), (20, 1.2), (30, 1.3), (40, 1.4), (50, 1.4), (60, 1.4)]:
        off.see({"loss": np.full(10, value)})
        assert off.judge(end, 1000, True).action == "ok"
