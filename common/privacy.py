"""Client-level differential privacy on the meme: clipping, noise and the (ε, δ) spent.

Pure functions shared by the client (clipping before sending, ``dp-mode=client``) and the
server (clipping on arrival, ``dp-mode=server``; noise; accounting). Only floating-point
arrays form the update: integer buffers (BatchNorm's ``num_batches_tracked``) are counters,
not learned values, and keep the value the server sent.

Accounting uses Google's ``dp-accounting`` (RDP), the backend of Flower's own accountant:

- every connected client trains every round (``fraction-train`` = 1): add/remove-one
  neighbours, one Gaussian release of noise multiplier σ per round;
- a sample of m out of N clients per round (Flower samples without replacement): the
  replace-one relation, for which the clipped sum's sensitivity is 2C, so the Gaussian
  event's multiplier is σ/2 (``dp-accounting`` expects noise std / sensitivity).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def is_update_array(a: np.ndarray) -> bool:
    """Floating arrays carry the learned update; integer buffers are counters."""
    return np.issubdtype(a.dtype, np.floating)


def update_norm(new: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``new - ref`` over the floating arrays (in float64)."""
    total = 0.0
    for k, a in new.items():
        if is_update_array(a):
            d = np.asarray(a, np.float64) - np.asarray(ref[k], np.float64)
            total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def clip_update(new: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray],
                clipping_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """``ref + min(1, C/‖Δ‖)·Δ`` with ``Δ = new - ref`` (FlatClip, McMahan et al. 2018).

    Returns the clipped arrays (each in its own dtype; integer arrays take ``ref``'s values)
    and ``‖Δ‖`` before clipping. A non-finite update is returned unchanged (the validator
    rejects it), never scaled into something that looks valid.
    """
    norm = update_norm(new, ref)
    scale = min(1.0, clipping_norm / norm) if norm > 0 and math.isfinite(norm) else 1.0
    out: dict[str, np.ndarray] = {}
    for k, a in new.items():
        if not is_update_array(a):
            out[k] = np.array(ref[k], copy=True)
            continue
        base = np.asarray(ref[k], np.float64)
        out[k] = (base + scale * (np.asarray(a, np.float64) - base)).astype(a.dtype)
    return out, norm


def secure_normal(shape: tuple[int, ...], std: float) -> np.ndarray:
    """``N(0, std²)`` samples (float64) from the operating system's CSPRNG (``os.urandom``).

    DP noise must be unpredictable to whoever holds the run config, the outputs or the
    checkpoint: a seeded generator lets anyone who knows the seed subtract the noise.
    Box-Muller on 53-bit uniforms; ``u1`` lies in (0, 1] so the logarithm is finite.
    """
    n = math.prod(shape)
    pairs = (n + 1) // 2
    raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])
    return std * z[:n].reshape(shape)


def fix_statistics(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Post-process a noised meme so its BatchNorm statistics stay usable.

    ``running_var`` is a variance: noise can push it below zero (NaN in evaluation), so it
    is clamped at 0 (BatchNorm adds its own eps). Post-processing costs no privacy.
    """
    for k, v in out.items():
        if k.endswith("running_var"):
            np.maximum(v, 0, out=v)
    return out


def noisy_mean_update(ref: Mapping[str, np.ndarray],
                      clipped: Sequence[Mapping[str, np.ndarray]], num_sampled: int,
                      noise_std: float) -> dict[str, np.ndarray]:
    """``ref + (Σ Δ_i) / m + N(0, std²)``: the fixed-denominator estimator.

    Dividing by the number *sampled* (m), not the number that answered, keeps the
    sensitivity of the average at C/m even when a client fails mid-round, so the noise
    ``σ·C/m`` still buys the accounted ε (a missing client counts as a zero update).
    The noise comes from :func:`secure_normal`, never from the run's seed. Floating
    statistics buffers (BatchNorm's running mean and variance) depend on the clients' data
    as much as the weights do: they are clipped and noised with them, then made valid again
    by :func:`fix_statistics`; integer counters keep ``ref``'s value.
    """
    if num_sampled < len(clipped) or num_sampled <= 0:
        raise ValueError(f"num_sampled={num_sampled} must be >= the {len(clipped)} updates")
    out: dict[str, np.ndarray] = {}
    for k, base in ref.items():
        if not is_update_array(base):
            out[k] = np.array(base, copy=True)
            continue
        b = np.asarray(base, np.float64)
        total = sum((np.asarray(c[k], np.float64) - b for c in clipped), np.zeros_like(b))
        noise = secure_normal(b.shape, noise_std) if noise_std > 0 else 0.0
        out[k] = (b + total / num_sampled + noise).astype(base.dtype)
    return fix_statistics(out)


@dataclass(frozen=True)
class Release:
    """One noised meme: σ, and m clients sampled out of the N connected."""

    noise_multiplier: float
    sampled: int
    population: int


def epsilon_spent(releases: Sequence[Release], delta: float, *, subsampled: bool) -> float:
    """ε at ``delta`` after the releases (RDP accountant of ``dp-accounting``).

    ``subsampled``: clients were sampled (``fraction-train`` < 1), accounted as sampling
    without replacement under replace-one neighbours; otherwise add/remove-one with no
    amplification. σ = 0 means no privacy: ε = inf.
    """
    from dp_accounting import NeighboringRelation, dp_event  # the flwr[dp] extra
    from dp_accounting.rdp import RdpAccountant

    if not releases:
        return 0.0
    if any(r.noise_multiplier <= 0 for r in releases):
        return math.inf
    counts = Counter(releases)  # identical rounds compose at once (the RDP is computed once)
    if not subsampled:
        acc = RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
        for r, n in counts.items():
            acc.compose(dp_event.GaussianDpEvent(r.noise_multiplier), n)
        return float(acc.get_epsilon(delta))
    acc = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    for r, n in counts.items():
        gauss = dp_event.GaussianDpEvent(r.noise_multiplier / 2)  # sensitivity 2C
        acc.compose(dp_event.SampledWithoutReplacementDpEvent(r.population, r.sampled, gauss)
                    if r.sampled < r.population else gauss, n)
    return float(acc.get_epsilon(delta))


def noise_for_epsilon(epsilon: float, rounds: int, delta: float, *, sampled: int = 1,
                      population: int = 1) -> float:
    """The smallest σ (rounded up to 3 significant digits) whose ``rounds`` releases spend <= ε.

    For presets and the privacy/utility grid: "ε = 4 over 10 rounds" becomes a σ.
    """
    subsampled = sampled < population

    def eps(sigma: float) -> float:
        return epsilon_spent([Release(sigma, sampled, population)] * rounds, delta,
                             subsampled=subsampled)

    lo, hi = 0.01, 1.0
    while eps(hi) > epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no noise multiplier <= 1e4 reaches epsilon={epsilon}")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= epsilon else (mid, hi)
    scale = 10.0 ** (2 - math.floor(math.log10(hi)))  # round *up* to 3 significant digits
    return math.ceil(hi * scale) / scale
