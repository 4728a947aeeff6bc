"""Differential entropy of directions on the sphere, estimated and in closed form.

All entropies are in nats (natural log). Directions live on the unit sphere S^{d-1}, which has
D = d - 1 degrees of freedom; the entropy of a direction distribution is taken with respect to the
sphere's surface measure.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import digamma, gammaln

# Nearest-neighbour distances below this are clipped: duplicate samples would give log 0.
MIN_DISTANCE = 1e-12


def kozachenko_leonenko(samples: np.ndarray, k: int = 1) -> float:
    """Estimate the differential entropy (nats) of i.i.d. samples in R^D.

    Kozachenko-Leonenko estimator with the k-th nearest neighbour in the Euclidean norm:
    H = D * mean(log eps_k) + log V_D + psi(N) - psi(k), where V_D = pi^{D/2} / Gamma(D/2 + 1)
    is the volume of the unit D-ball.

    samples: (N, D) array. Raises ValueError when N <= k.
    """
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 2:
        raise ValueError(f"samples must be a 2-D array (N, D), got shape {samples.shape}")
    n, dim = samples.shape
    if n <= k:
        raise ValueError(f"need more than k = {k} samples for the k-NN entropy, got {n}")

    distances, _ = cKDTree(samples).query(samples, k=k + 1)
    eps = np.maximum(distances[:, k], MIN_DISTANCE)
    log_unit_ball = 0.5 * dim * math.log(math.pi) - gammaln(0.5 * dim + 1.0)
    return float(dim * np.mean(np.log(eps)) + log_unit_ball + digamma(n) - digamma(k))


def graph_length_entropy(samples: np.ndarray, k: int = 50, gamma: float = 1.0, manifold_dim: int | None = None) -> float:
    """Entropic-graph estimate (nats) from the total length of the k-nearest-neighbour graph.

    L_k = sum_i sum_{j in kNN(i)} ||x_i - x_j||^gamma (Euclidean, distances clipped at 1e-8), and
    S = (m / gamma) * (ln L_k - ((m - gamma) / m) ln N), with m the dimension of the manifold the
    samples live on (default: the ambient dimension minus 1, for points on a sphere). It estimates
    the Renyi entropy of order (m - gamma)/m, which is close to Shannon entropy for large m. The
    estimate carries an additive constant that depends on m, k and gamma only. Compare estimates of the same m, k
    and gamma; absolute values are not entropies.

    samples: (N, n) array. Raises ValueError when N <= k.
    """
    samples = np.asarray(samples, dtype=np.float64)
    n = samples.shape[0]
    if n <= k:
        raise ValueError(f"need more than k = {k} samples for the graph-length entropy, got {n}")
    m = manifold_dim if manifold_dim is not None else samples.shape[1] - 1
    if m < 1:
        raise ValueError(f"manifold dimension must be >= 1, got {m}")
    distances, _ = cKDTree(samples).query(samples, k=k + 1)
    length = float(np.sum(np.maximum(distances[:, 1:], 1e-8) ** gamma))
    return (m / gamma) * (np.log(length) - ((m - gamma) / m) * np.log(n))


def to_hyperspherical(directions: np.ndarray) -> np.ndarray:
    """Convert unit vectors (N, d) to hyperspherical angles (N, d - 1).

    phi_j = atan2(||x_{j+1:}||, x_j) in [0, pi] for j < d - 2, and the last angle
    phi_{d-2} = atan2(x_{d-1}, x_{d-2}) in (-pi, pi] (0-based indices). The chart has poles where a
    polar angle is 0 or pi and a branch cut where the last angle is +-pi.
    """
    x = np.asarray(directions, dtype=np.float64)
    d = x.shape[1]
    # tail[:, j] = ||x_{j:}||, computed from the end to avoid cancellation.
    tail = np.sqrt(np.cumsum(x[:, ::-1] ** 2, axis=1)[:, ::-1])
    angles = np.empty((x.shape[0], d - 1))
    for j in range(d - 2):
        angles[:, j] = np.arctan2(tail[:, j + 1], x[:, j])
    angles[:, d - 2] = np.arctan2(x[:, d - 1], x[:, d - 2])
    return angles


def log_jacobian(angles: np.ndarray) -> np.ndarray:
    """Log surface-measure density of the angle chart: sum_j (d - 2 - j) log sin phi_j (0-based)."""
    d = angles.shape[1] + 1
    exponents = np.arange(d - 2, 0, -1, dtype=np.float64)  # (d - 2,)
    sines = np.maximum(np.sin(angles[:, : d - 2]), MIN_DISTANCE)
    return np.log(sines) @ exponents


def rotate_mean_to_chart_centre(directions: np.ndarray) -> np.ndarray:
    """Reflect the directions so their mean points where the angle chart is flattest.

    The target is the basis vector e_{d-2} (0-based), where every polar angle is pi/2 and the last
    angle is 0: as far as possible from the poles and the branch cut. Entropy is invariant under the
    reflection. For a nearly uniform cloud the mean is ill defined and the rotation is skipped.
    """
    x = np.asarray(directions, dtype=np.float64)
    d = x.shape[1]
    mean = x.mean(axis=0)
    length = np.linalg.norm(mean)
    if length < 1e-3:
        return x
    target = np.zeros(d)
    target[d - 2] = 1.0
    v = mean / length - target
    norm_v = np.linalg.norm(v)
    if norm_v < 1e-12:
        return x
    v /= norm_v
    return x - 2.0 * np.outer(x @ v, v)


def direction_entropy(directions: np.ndarray, k: int = 1, standardise: bool = True) -> float:
    """Estimate the entropy (nats) of a distribution of directions on S^{d-1} from samples.

    Steps: normalise to unit length, and reflect the cloud's mean to the centre of the angle chart.
    Convert to d - 1 hyperspherical angles, and optionally centre and scale each angle by its
    standard deviation s_j (adding sum log s_j back). Apply the Kozachenko-Leonenko estimator in the
    chart, then add the mean log-Jacobian, which turns chart entropy into surface entropy.

    directions: (N, d) array, any positive lengths.
    """
    x = np.asarray(directions, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"directions must have shape (N, d) with d >= 2, got {x.shape}")
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    x = rotate_mean_to_chart_centre(x)
    angles = to_hyperspherical(x)

    log_scale = 0.0
    if standardise:
        scale = angles.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        angles = (angles - angles.mean(axis=0)) / scale
        log_scale = float(np.sum(np.log(scale)))

    chart_entropy = kozachenko_leonenko(angles, k) + log_scale
    return chart_entropy + float(np.mean(log_jacobian(to_hyperspherical(x))))


def gaussian_direction_entropy(temperature: float | np.ndarray, dim: int, curvature: float = 1.0) -> np.ndarray:
    """Small-temperature entropy (nats) of the Gibbs law exp(-L/T) on S^{dim-1}.

    Near a minimum with curvature h in all dim - 1 tangent directions the law is Gaussian with
    variance T/h per direction: S = (dim - 1)/2 * log(2 pi e T / h).
    """
    return 0.5 * (dim - 1) * np.log(2.0 * np.pi * np.e * np.asarray(temperature) / curvature)


def von_mises_fisher_entropy_s2(temperature: float | np.ndarray) -> np.ndarray:
    """Exact entropy (nats) of the von Mises-Fisher law on S^2 with concentration kappa = 1/T.

    S = log(4 pi sinh(kappa) / kappa) - kappa coth(kappa) + 1, written with
    log sinh(kappa) = kappa + log1p(-exp(-2 kappa)) - log 2 so it stays finite for large kappa.
    """
    kappa = 1.0 / np.asarray(temperature, dtype=np.float64)
    log_sinh = kappa + np.log1p(-np.exp(-2.0 * kappa)) - np.log(2.0)
    coth = 1.0 / np.tanh(kappa)
    return np.log(4.0 * np.pi) + log_sinh - np.log(kappa) - kappa * coth + 1.0


def uniform_sphere_entropy(dim: int) -> float:
    """Entropy (nats) of the uniform law on S^{dim-1}: the log of its surface area."""
    return float(math.log(2.0) + 0.5 * dim * math.log(math.pi) - gammaln(0.5 * dim))
