"""Differential privacy for federated averaging: clipping, Gaussian noise,
adaptive quantile clipping, and local DP.

Central DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially
Private Recurrent Language Models", ICLR 2018, Alg. 1 with the fixed-denominator
estimator f~_f):

    each client update  D_k  is clipped to L2 norm C:  D_k <- D_k * min(1, C / ||D_k||)
    the server computes  S = sum_k D_k  (every client has weight 1)
    and releases          (S + N(0, (z C)^2 I)) / m

where z is the noise multiplier and m the *expected* cohort size (the fixed
denominator q W of the paper with w_k = 1).  The noise is added to the SUM,
whose L2 sensitivity under adding/removing one client is C; dividing by the
fixed m afterwards is post-processing, so it is the same as adding noise of std
z C / m to the mean.  The denominator is fixed (not the number of clients that
replied) because the count of replies itself depends on who took part.
Example-count weights are NOT applied under DP: a weight > 1 would raise the
sensitivity above C.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private
Learning with Adaptive Clipping", NeurIPS 2021, Alg. 1 and its privacy
analysis): C tracks
the gamma-quantile of the update norms by the geometric rule

    b~ = (sum_k (1[||D_k|| <= C] - 1/2) + N(0, sigma_b^2)) / m + 1/2
    C  <- C * exp(-eta_C * (b~ - gamma))

and the update noise multiplier is raised to
z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), so that releasing both the noised
update sum and the noised count is exactly as private as one Gaussian
mechanism with noise multiplier z (the centered indicator has sensitivity 1/2);
the accountant therefore records z.

Local DP: each client clips its own update to C and adds N(0, (z C)^2 I) before
it leaves the device; under replacement of the client's data the L2
sensitivity of that release is 2 C, so each release is a Gaussian mechanism
with noise multiplier z / 2 (see `PrivacyAccountant(mode="local")`).

Randomness: noise comes from a seeded torch generator so simulations are
reproducible and resumable from a checkpoint.  torch's generator is not a
cryptographic RNG and floating-point Gaussian sampling has known side channels
(Mironov, CCS 2012); a deployment that must resist them needs a secure sampler.
"""

from __future__ import annotations

import base64
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from .secagg import SecureAggregation


def _as_matrix(updates) -> tuple[torch.Tensor, bool]:
    was_numpy = isinstance(updates, np.ndarray)
    t = torch.as_tensor(updates)
    if t.ndim != 2:
        raise ValueError(f"updates must be an (n, d) matrix, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t, was_numpy


def _check_clip_norm(clip_norm: float) -> float:
    c = float(clip_norm)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    return c


def _check_noise_multiplier(z: float) -> float:
    z = float(z)
    if not (math.isfinite(z) and z >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {z!r}")
    return z


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU torch generator; `None` seeds it from the operating system."""
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else int(seed))
    return g


def clip_updates(updates, clip_norm: float):
    """Per-row L2 clipping (McMahan et al., ICLR 2018, Alg. 1 `ClipFn`):
    ``row <- row * min(1, C / ||row||)``.

    Returns ``(clipped, norms)`` where `norms` are the L2 norms *before*
    clipping (what adaptive clipping needs).  Rows already within the bound are
    returned bit-for-bit unchanged (their factor is exactly 1).  Works on an
    (n, d) torch tensor or numpy array and returns the same kind.
    """
    c = _check_clip_norm(clip_norm)
    u, was_numpy = _as_matrix(updates)
    if not bool(torch.isfinite(u).all()):
        raise ValueError("cannot clip non-finite updates (NaN or inf): validate before clipping")
    norms = torch.linalg.vector_norm(u, dim=1)
    # Rows within the bound get a factor of exactly 1 (torch evaluates `scalar / tensor`
    # as scalar * reciprocal(tensor), which is not exact, so do not compute C / C).
    factor = torch.where(norms > c, torch.full_like(norms, c) / norms, torch.ones_like(norms))
    clipped = u * factor.unsqueeze(1).to(u.dtype)
    if was_numpy:
        return clipped.numpy(), norms.numpy()
    return clipped, norms


def central_noise(aggregate, clip_norm: float, noise_multiplier: float, n: float, generator: torch.Generator | None = None, *, of: str = "sum"):
    """The Gaussian mechanism of DP-FedAvg (McMahan et al., ICLR 2018, Alg. 1,
    fixed-denominator estimator): returns ``(S + N(0, (z C)^2 I)) / n``.

    `aggregate` is the SUM ``S`` of the n clipped updates (``of="sum"``, the
    default), whose L2 sensitivity is C; or their mean ``S / n``
    (``of="mean"``), to which noise of std ``z C / n`` is added -- the same
    distribution.  `n` is the fixed denominator: the EXPECTED cohort size, not
    the number of clients that replied.
    """
    c = _check_clip_norm(clip_norm)
    z = _check_noise_multiplier(noise_multiplier)
    if not (float(n) > 0):
        raise ValueError(f"the denominator n must be > 0, got {n!r}")
    if of not in ("sum", "mean"):
        raise ValueError(f"of must be 'sum' or 'mean', got {of!r}")
    was_numpy = isinstance(aggregate, np.ndarray)
    a = torch.as_tensor(aggregate)
    if not a.is_floating_point():
        a = a.to(torch.float32)
    noise = torch.randn(a.shape, generator=generator, dtype=a.dtype) * (z * c)
    out = (a + noise) / float(n) if of == "sum" else a + noise / float(n)
    return out.numpy() if was_numpy else out


def local_noise(vec, clip_norm: float, noise_multiplier: float, generator: torch.Generator | None = None):
    """Local DP on one client (the Gaussian mechanism applied on the device,
    cf. McMahan et al. ICLR 2018 Alg. 1 with a cohort of one): clip `vec` to L2
    norm C, then add N(0, (z C)^2 I).  The release has sensitivity 2 C under
    replacement of the client's data, i.e. noise multiplier z / 2 for the
    accountant.  Returns the same kind (torch / numpy) as `vec`."""
    was_numpy = isinstance(vec, np.ndarray)
    v = torch.as_tensor(vec)
    if v.ndim != 1:
        raise ValueError(f"local_noise expects a (d,) vector, got shape {tuple(v.shape)}")
    clipped, _ = clip_updates(v.unsqueeze(0), clip_norm)
    z = _check_noise_multiplier(noise_multiplier)
    clipped = clipped[0]
    out = clipped + torch.randn(clipped.shape, generator=generator, dtype=clipped.dtype) * (z * float(clip_norm))
    return out.numpy() if was_numpy else out


class GaussianMechanism:
    """Noise on the sum of clipped updates, divided by a fixed denominator
    (McMahan et al., ICLR 2018, Alg. 1, estimator f~_f): std ``z C`` on the
    sum, i.e. ``z C / m`` on the mean, ``m`` = expected cohort size."""

    def __init__(self, noise_multiplier: float, expected_clients: float):
        self.noise_multiplier = _check_noise_multiplier(noise_multiplier)
        if not (float(expected_clients) > 0):
            raise ValueError(f"expected_clients must be > 0, got {expected_clients!r}")
        self.expected_clients = float(expected_clients)

    def __call__(self, total, clip_norm: float, generator: torch.Generator | None = None, noise_multiplier: float | None = None):
        z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        return central_noise(total, clip_norm, z, self.expected_clients, generator, of="sum")


class AdaptiveClipping:
    """Adaptive quantile clipping (Andrew et al., NeurIPS 2021, Alg. 1).

    State: the current clip norm ``C`` (explicit, see `state_dict`).  Each round
    the clients' centered indicators ``1[||D_k|| <= C] - 1/2`` are summed (in
    the clear or through secure aggregation), noised with std ``sigma_b``
    (`count_stddev`, default ``m / 20`` as the paper recommends), and C moves
    geometrically: ``C <- C exp(-eta_C (b~ - gamma))``.

    The update noise must then use `update_noise_multiplier(z)`:
    ``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (the paper's privacy analysis), which needs
    ``2 sigma_b > z``.
    """

    def __init__(
        self,
        initial_clip_norm: float,
        expected_clients: float,
        target_quantile: float = 0.5,
        learning_rate: float = 0.2,
        count_stddev: float | None = None,
    ):
        self.clip_norm = _check_clip_norm(initial_clip_norm)
        if not (float(expected_clients) > 0):
            raise ValueError(f"expected_clients must be > 0, got {expected_clients!r}")
        if not (0.0 < float(target_quantile) < 1.0):
            raise ValueError(f"target_quantile must be in (0, 1), got {target_quantile!r}")
        if not (math.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate (eta_C) must be > 0, got {learning_rate!r}")
        self.expected_clients = float(expected_clients)
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        sb = self.expected_clients / 20.0 if count_stddev is None else float(count_stddev)
        if not (math.isfinite(sb) and sb >= 0):
            raise ValueError(f"count_stddev (sigma_b) must be >= 0, got {count_stddev!r}")
        self.count_stddev = sb

    def update_noise_multiplier(self, noise_multiplier: float) -> float:
        """``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (Andrew et al. 2021)."""
        z = _check_noise_multiplier(noise_multiplier)
        if z == 0:
            return 0.0
        two_sb = 2.0 * self.count_stddev
        if two_sb <= z:
            raise ValueError(
                f"adaptive clipping with noise_multiplier z = {z} needs clip_count_stddev sigma_b > z / 2 = {z / 2:g} "
                f"(got {self.count_stddev:g}): z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) is undefined otherwise; "
                f"raise the count noise or lower z"
            )
        return (z**-2 - two_sb**-2) ** -0.5

    def indicators(self, norms) -> torch.Tensor:
        """Centered indicators ``1[norm <= C] - 1/2`` (sensitivity 1/2), one per client."""
        n = torch.as_tensor(norms, dtype=torch.float64)
        return (n <= self.clip_norm).to(torch.float64) - 0.5

    def step(self, centered_sum: float, generator: torch.Generator | None = None) -> float:
        """Noise the centered count, update C in place, return the noised
        fraction ``b~`` (Andrew et al. 2021, Alg. 1, lines 'b~' and 'C')."""
        noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * self.count_stddev
        b = (float(centered_sum) + noise) / self.expected_clients + 0.5
        self.clip_norm = self.clip_norm * math.exp(-self.learning_rate * (b - self.target_quantile))
        return b

    def state_dict(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip_norm = _check_clip_norm(state["clip_norm"])


@dataclass
class DPAggregate:
    """One round of central DP-FedAvg.

    `mean` is what the server optimizer gets.  `clip_norm` is the C used this
    round, `next_clip_norm` the C for the next one.  `noise_multiplier` is the
    z_Delta applied to the update sum; `accounting_noise_multiplier` the z to
    record in the accountant.  `noised_below_fraction` (adaptive only) is
    released with DP; `clipped_fraction` is exact and therefore NOT private:
    keep it in server-internal monitoring only.
    """

    mean: torch.Tensor
    clip_norm: float
    next_clip_norm: float
    noise_multiplier: float
    accounting_noise_multiplier: float
    noise_std: float  # std of the noise on the sum (z_Delta C)
    clients: int
    clipped_fraction: float
    noised_below_fraction: float = math.nan

    def to_metrics(self) -> dict[str, float]:
        """The DP-safe numbers for ``RoundRecord.extra`` (not `clipped_fraction`)."""
        return {
            "dp_clip_norm": self.clip_norm,
            "dp_next_clip_norm": self.next_clip_norm,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_noise_std": self.noise_std,
            "dp_noised_below_fraction": self.noised_below_fraction,
        }


class CentralDP:
    """The `central` privacy part: DP-FedAvg (McMahan et al., ICLR 2018, Alg. 1)
    with fixed or adaptive (Andrew et al., NeurIPS 2021) clipping.

    ``aggregate(updates (n, d)) -> DPAggregate``: clip each row to C, sum (in
    the clear, or through `secure` aggregation: then rows are sent as
    ``D_k / C``, coordinates in [-1, 1], plus the centered clip indicator as
    one extra coordinate, so the server only sees sums), add N(0, (z_Delta C)^2)
    to the sum and divide by `expected_clients`.

    State for checkpoints (`state_dict`): the adaptive C and the noise RNG.
    """

    name = "central"

    def __init__(
        self,
        noise_multiplier: float,
        clip_norm: float,
        expected_clients: float,
        adaptive: AdaptiveClipping | None = None,
        seed: int | None = None,
    ):
        self.mechanism = GaussianMechanism(noise_multiplier, expected_clients)
        self._clip_norm = _check_clip_norm(clip_norm)
        self.adaptive = adaptive
        if adaptive is not None:
            adaptive.update_noise_multiplier(noise_multiplier)  # fail at construction, not mid-run
        self.generator = seeded_generator(seed)

    @property
    def noise_multiplier(self) -> float:
        """The z the accountant records (for adaptive clipping: the combined one)."""
        return self.mechanism.noise_multiplier

    @property
    def expected_clients(self) -> float:
        return self.mechanism.expected_clients

    @property
    def clip_norm(self) -> float:
        return self.adaptive.clip_norm if self.adaptive is not None else self._clip_norm

    def update_noise_multiplier(self) -> float:
        """The z_Delta put on the update sum (= z for fixed clipping)."""
        z = self.noise_multiplier
        return self.adaptive.update_noise_multiplier(z) if self.adaptive is not None else z

    def aggregate(self, updates, *, secure: "SecureAggregation | None" = None, dropped: int = 0, round: int = 0,
                  client_ids=None) -> DPAggregate:
        """Clip, sum (optionally securely), noise, divide by the expected cohort;
        then step adaptive clipping.  `dropped`: clients that took part in
        secure aggregation's key exchange and then dropped (simulation).  When
        `secure` has a remote half (gRPC), each client of `client_ids` clips and
        scales its own row on its device (the same recipe) and `updates` is only
        the placeholder matrix: the server adds the noise to the unmasked sum."""
        u, _ = _as_matrix(updates)
        n, d = u.shape
        if n == 0:
            raise ValueError("cannot aggregate an empty cohort (n = 0)")
        c = self.clip_norm
        z_upd = self.update_noise_multiplier()
        norms = None
        if secure is not None and getattr(secure, "remote", None) is not None:
            from .secagg import RowRecipe

            slack = secure.quantizer.max_l2_error(d)
            if secure.quantizer.clip_range < 1.0 or slack >= 0.5:
                raise ValueError(f"secure aggregation under central DP needs clip_range >= 1 and a fine quantizer (L2 rounding error {slack:.3g})")
            recipe = RowRecipe(clip_norm=c * (1.0 - slack), scale=1.0 / c, indicator_norm=c if self.adaptive is not None else 0.0)
            s, _res = secure.remote_sum(round, client_ids, recipe, dim=d)
            s = s.to(torch.float64)
            total = s[:d] * c
            centered = float(s[d]) if self.adaptive is not None else 0.0
        elif secure is None:
            clipped, norms = clip_updates(u, c)
            total = clipped.to(torch.float64).sum(0)
            centered = float(self.adaptive.indicators(norms).sum()) if self.adaptive is not None else 0.0
        else:
            if secure.quantizer.clip_range < 1.0:
                raise ValueError(f"secure aggregation under central DP sends D_k / C in [-1, 1]: its clip_range must be >= 1, got {secure.quantizer.clip_range}")
            # Rounding can lengthen a vector by up to max_l2_error; clip shorter so
            # the dequantized update still has norm <= C (sensitivity stays C).
            slack = secure.quantizer.max_l2_error(d)
            if slack >= 0.5:
                raise ValueError(f"quantization too coarse for DP: L2 rounding error {slack:.3g} of a unit-norm update; raise secagg_modulus_bits")
            clipped, norms = clip_updates(u, c * (1.0 - slack))
            rows = clipped.to(torch.float64) / c
            if self.adaptive is not None:
                rows = torch.cat([rows, self.adaptive.indicators(norms).unsqueeze(1)], dim=1)
            s = secure.sum(rows, dropped=dropped).to(torch.float64)
            total = s[:d] * c
            centered = float(s[d]) if self.adaptive is not None else 0.0
        mean = self.mechanism(total, c, self.generator, noise_multiplier=z_upd).to(u.dtype)
        clipped_fraction = float((norms > c).to(torch.float64).mean()) if norms is not None else math.nan
        b = math.nan
        if self.adaptive is not None:
            b = self.adaptive.step(centered, self.generator)
        return DPAggregate(
            mean=mean,
            clip_norm=c,
            next_clip_norm=self.clip_norm,
            noise_multiplier=z_upd,
            accounting_noise_multiplier=self.noise_multiplier,
            noise_std=z_upd * c,
            clients=n,
            clipped_fraction=clipped_fraction,
            noised_below_fraction=b,
        )

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe: adaptive C and the noise generator state (base64)."""
        state: dict[str, Any] = {"rng": base64.b64encode(self.generator.get_state().numpy().tobytes()).decode("ascii")}
        if self.adaptive is not None:
            state["adaptive"] = self.adaptive.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" in state:
            raw = np.frombuffer(base64.b64decode(state["rng"]), dtype=np.uint8).copy()
            self.generator.set_state(torch.from_numpy(raw))
        if self.adaptive is not None and "adaptive" in state:
            self.adaptive.load_state_dict(state["adaptive"])
        elif self.adaptive is not None:
            raise ValueError("checkpoint has no adaptive clipping state, but adaptive clipping is configured")


class LocalDP:
    """The `local` privacy part: every client clips and noises its own update
    before it is encoded and sent (`local_noise`).  Any server aggregator is
    then post-processing.  Record ``noise_multiplier`` in a
    ``PrivacyAccountant(mode="local")``, which accounts for sensitivity 2 C."""

    name = "local"

    def __init__(self, clip_norm: float, noise_multiplier: float):
        self.clip_norm = _check_clip_norm(clip_norm)
        self.noise_multiplier = _check_noise_multiplier(noise_multiplier)

    def apply(self, vec, generator: torch.Generator | None = None):
        """`local_noise` with this part's C and z: clip to C, add N(0, (z C)^2 I)."""
        return local_noise(vec, self.clip_norm, self.noise_multiplier, generator)

    @staticmethod
    def client_generator(seed: int, round: int, client_id: int) -> torch.Generator:
        """A per-(run, round, client) generator, so simulated local noise is reproducible."""
        ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x10CA1, int(round), int(client_id)])
        return seeded_generator(int(ss.generate_state(2, dtype=np.uint64)[0] >> 1))
