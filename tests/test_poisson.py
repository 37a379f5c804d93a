"""The discrete operators and the exact DCT Poisson solve (neurimg.poisson)."""

import numpy as np
import pytest

from neurimg import poisson


@pytest.mark.parametrize("shape", [(16, 16, 3), (5, 7, 3), (1, 6, 2), (6, 1, 1), (1, 1, 3)])
def test_reconstructs_image_from_its_own_gradients(shape, rng):
    u = rng.random(shape)
    gx, gy = poisson.forward_differences(u)
    rec = poisson.solve_exact(gx, gy, u.mean((0, 1)))
    assert np.abs(rec - u).max() < 1e-10


def test_forward_differences_by_hand():
    u = np.array([[0.0, 1.0, 3.0], [2.0, 2.0, 0.0]])[..., None]
    gx, gy = poisson.forward_differences(u)
    assert gx[..., 0].tolist() == [[1, 2, 0], [0, -2, 0]]
    assert gy[..., 0].tolist() == [[2, 1, -3], [0, 0, 0]]
    assert poisson.x_valid(2, 3).tolist() == [[True, True, False]] * 2
    assert poisson.y_valid(2, 3).tolist() == [[True] * 3, [False] * 3]


def test_divergence_is_the_adjoint_of_the_differences(rng):
    u = rng.normal(size=(6, 9, 3))
    gx, gy = rng.normal(size=(6, 9, 3)), rng.normal(size=(6, 9, 3))
    dx, dy = poisson.forward_differences(u)
    lhs = np.sum(dx * gx) + np.sum(dy * gy)
    rhs = np.sum(u * poisson.divergence_adjoint(gx, gy))
    assert abs(lhs - rhs) < 1e-10


def test_laplacian_stencil_and_neumann_boundary(rng):
    u = rng.normal(size=(7, 8, 1))
    lap = poisson.laplacian(u)[..., 0]
    v = u[..., 0]
    interior = v[:-2, 1:-1] + v[2:, 1:-1] + v[1:-1, :-2] + v[1:-1, 2:] - 4 * v[1:-1, 1:-1]
    assert np.allclose(lap[1:-1, 1:-1], interior)
    # a corner sees two neighbours (mirrored boundary)
    assert np.isclose(lap[0, 0], v[0, 1] + v[1, 0] - 2 * v[0, 0])
    assert abs(lap.sum()) < 1e-10  # no flux through the boundary
    assert np.abs(poisson.laplacian(np.full((4, 5, 2), 0.3))).max() < 1e-15


def test_solve_poisson_inverts_the_laplacian_with_the_given_mean(rng):
    u = rng.normal(size=(9, 6, 2))
    rhs = -poisson.laplacian(u)  # D^T D u
    sol = poisson.solve_poisson(rhs, [0.25, -1.0])
    assert np.allclose(sol.mean((0, 1)), [0.25, -1.0])
    assert np.allclose(-poisson.laplacian(sol), rhs, atol=1e-10)
    assert np.allclose(sol - sol.mean((0, 1)), u - u.mean((0, 1)), atol=1e-10)


def test_least_squares_for_a_field_that_is_not_a_gradient(rng):
    """A curl-ful target: the solution satisfies the normal equations D^T D u = D^T g."""
    gx, gy = rng.normal(size=(5, 6, 1)), rng.normal(size=(5, 6, 1))
    u = poisson.solve_exact(gx, gy, 0.0)
    dx, dy = poisson.forward_differences(u)
    assert np.allclose(poisson.divergence_adjoint(dx - gx, dy - gy), 0, atol=1e-10)


def test_screened_solve(rng):
    u = rng.random((8, 8, 3))
    ref = rng.random((8, 8, 3))
    gx, gy = poisson.forward_differences(u)
    lam = 0.3
    sol = poisson.solve_exact(gx, gy, color_weight=lam, reference=ref)
    # normal equations (D^T D + lam) sol = D^T g + lam ref
    lhs = -poisson.laplacian(sol) + lam * sol
    assert np.allclose(lhs, poisson.divergence_adjoint(gx, gy) + lam * ref, atol=1e-10)
    assert np.allclose(sol.mean((0, 1)), ref.mean((0, 1)))
    # a huge weight pins the solution to the reference
    assert np.abs(poisson.solve_exact(gx, gy, color_weight=1e8, reference=ref) - ref).max() < 1e-6
    with pytest.raises(ValueError):
        poisson.solve_screened(ref, 0.0)
