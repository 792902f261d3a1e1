"""The Fréchet distance math behind FVD: closed forms, invariances, and scipy's sqrtm as a cross-check."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import special_ortho_group

from eval.fvd import feature_moments, frechet_distance, frechet_distance_from_moments, sqrtm_psd


def exact_samples(n: int, mean: np.ndarray, cov: np.ndarray, seed: int = 0) -> np.ndarray:
    """(n, d) samples whose sample mean and (N-1)-normalised covariance are exactly `mean`, `cov`."""
    x = np.random.default_rng(seed).standard_normal((n, len(mean)))
    x -= x.mean(axis=0)
    whiten = np.linalg.inv(np.linalg.cholesky(x.T @ x / (n - 1)))  # sample cov -> identity
    return x @ whiten.T @ np.linalg.cholesky(cov).T + mean


def scipy_frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """The usual FID formula with scipy's general sqrtm (test-only reference)."""
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_1d_normal_closed_form() -> None:
    # N(0, 1) vs N(3, 4): (0 - 3)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 10
    assert frechet_distance_from_moments(np.array([0.0]), np.array([[1.0]]), np.array([3.0]), np.array([[4.0]])) == 10.0
    a = exact_samples(50, np.array([0.0]), np.array([[1.0]]), seed=1)
    b = exact_samples(70, np.array([3.0]), np.array([[4.0]]), seed=2)
    assert frechet_distance(a, b) == pytest.approx(10.0, abs=1e-12)


def test_moments_use_n_minus_1() -> None:
    feats = np.array([[0.0], [2.0]])  # mean 1, unbiased variance 2 (biased would be 1)
    mu, sigma = feature_moments(feats)
    assert mu.tolist() == [1.0] and sigma.tolist() == [[2.0]]


def test_multivariate_closed_form() -> None:
    # commuting (diagonal) covariances: ||dmu||^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # 5 + 1 + 1 + 1
    assert frechet_distance_from_moments(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-12)


def test_symmetric_and_invariant_to_shared_rotation_and_shift() -> None:
    rng = np.random.default_rng(0)
    f1 = rng.standard_normal((200, 8)) @ rng.standard_normal((8, 8))
    f2 = rng.standard_normal((150, 8)) * 2 + 1
    d = frechet_distance(f1, f2)
    assert d > 1
    assert frechet_distance(f2, f1) == pytest.approx(d, rel=1e-10)
    rot, shift = special_ortho_group.rvs(8, random_state=1), rng.standard_normal(8) * 5
    assert frechet_distance(f1 @ rot + shift, f2 @ rot + shift) == pytest.approx(d, rel=1e-9)


def test_scales_quadratically() -> None:
    rng = np.random.default_rng(1)
    f1, f2 = rng.standard_normal((100, 6)), rng.standard_normal((120, 6)) + 0.5
    assert frechet_distance(3.0 * f1, 3.0 * f2) == pytest.approx(9.0 * frechet_distance(f1, f2), rel=1e-10)


@pytest.mark.parametrize("n", [500, 20])  # n = 20 < d = 64: rank-deficient covariance
def test_set_against_itself_is_zero(n: int) -> None:
    feats = np.random.default_rng(2).standard_normal((n, 64)) * 3
    assert abs(frechet_distance(feats, feats)) < 1e-8 * np.trace(np.cov(feats, rowvar=False))


@pytest.mark.parametrize("n1, n2, d", [(300, 250, 16), (40, 30, 64), (5, 7, 400)])  # the last two: N < dim
def test_agrees_with_scipy_sqrtm(n1: int, n2: int, d: int) -> None:
    rng = np.random.default_rng(d)
    f1 = rng.standard_normal((n1, d)) @ rng.standard_normal((d, d)) * 0.3
    f2 = rng.standard_normal((n2, d)) + rng.standard_normal(d)
    ours, ref = frechet_distance(f1, f2), scipy_frechet(f1, f2)
    assert ours == pytest.approx(ref, rel=1e-6)


def test_sqrtm_psd_squares_back_and_clips_rounding_negatives() -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((10, 4))
    cov = a @ a.T  # rank 4 of 10: eigenvalues ~0 may come out slightly negative
    root = sqrtm_psd(cov)
    assert np.allclose(root @ root, cov, atol=1e-9)
    assert np.allclose(root, root.T) and np.linalg.eigvalsh(root).min() > -1e-7


def test_sample_count_bias_of_identical_distributions() -> None:
    # Two draws of N(0, I_d): E[FD] ~ d(d+1)/(2N) + 2d/N > 0, shrinking like 1/N.
    d, rng = 16, np.random.default_rng(4)
    for n in (64, 1024):
        draws = [frechet_distance(rng.standard_normal((n, d)), rng.standard_normal((n, d))) for _ in range(20)]
        expected = d * (d + 1) / (2 * n) + 2 * d / n
        assert np.mean(draws) == pytest.approx(expected, rel=0.25)
