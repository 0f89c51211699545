"""Device profiles: how fast a client computes and how fast its links are.

A fleet is stored as a struct of arrays (four floats per client), so a
population of 100,000 devices costs a few megabytes and a cohort's timings are
computed in one vectorised expression.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import DevicesConfig


@dataclass(frozen=True)
class DeviceProfile:
    compute_sps: float  # training samples per second
    uplink_mbps: float
    downlink_mbps: float
    latency_s: float  # one-way, paid once per transfer

    def download_seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes * 8.0 / (self.downlink_mbps * 1e6)

    def upload_seconds(self, nbytes: int) -> float:
        return self.latency_s + nbytes * 8.0 / (self.uplink_mbps * 1e6)

    def compute_seconds(self, samples: int) -> float:
        return samples / self.compute_sps

    def completion_seconds(self, down_bytes: int, samples: int, up_bytes: int) -> float:
        """Seconds from dispatch to the reply's arrival: download + compute + upload."""
        return self.download_seconds(down_bytes) + self.compute_seconds(samples) + self.upload_seconds(up_bytes)


@dataclass
class Fleet:
    """Profiles of a whole population, one array per attribute.

    Availability is a per-device diurnal pattern: device c is online while
    ``(t / day_s + phase[c]) mod 1 < online_frac[c]``; `dropout[c]` is the probability
    that it abandons a task mid-round.  Defaults: always online, never drops.
    """

    compute_sps: np.ndarray
    uplink_mbps: np.ndarray
    downlink_mbps: np.ndarray
    latency_s: np.ndarray
    dropout: np.ndarray | None = None
    phase: np.ndarray | None = None
    online_frac: np.ndarray | None = None
    day_s: float = 600.0
    memory_mb: np.ndarray | None = None  # training memory per device (None: unknown)

    @property
    def always_online(self) -> bool:
        return self.phase is None or self.online_frac is None

    def online(self, clients: np.ndarray, t: float) -> np.ndarray:
        """Which of `clients` are online at simulated time `t`."""
        c = np.asarray(clients, dtype=np.int64)
        if self.always_online:
            return np.ones(c.shape, dtype=bool)
        u = np.mod(t / self.day_s + self.phase[c], 1.0)
        return u < self.online_frac[c]

    def offline_after(self, clients: np.ndarray, t: float) -> np.ndarray:
        """Seconds after `t` until each (online) client goes offline (inf if never)."""
        c = np.asarray(clients, dtype=np.int64)
        if self.always_online:
            return np.full(c.shape, np.inf)
        u = np.mod(t / self.day_s + self.phase[c], 1.0)
        left = np.where(u < self.online_frac[c], (self.online_frac[c] - u) * self.day_s, 0.0)
        return np.where(self.online_frac[c] >= 1.0, np.inf, left)

    def dropout_prob(self, clients: np.ndarray) -> np.ndarray:
        c = np.asarray(clients, dtype=np.int64)
        return np.zeros(c.shape) if self.dropout is None else self.dropout[c]

    def __len__(self) -> int:
        return int(self.compute_sps.shape[0])

    def profile(self, client: int) -> DeviceProfile:
        return DeviceProfile(
            float(self.compute_sps[client]),
            float(self.uplink_mbps[client]),
            float(self.downlink_mbps[client]),
            float(self.latency_s[client]),
        )

    def download_seconds(self, clients: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        c = np.asarray(clients, dtype=np.int64)
        return self.latency_s[c] + np.asarray(nbytes, dtype=np.float64) * 8.0 / (self.downlink_mbps[c] * 1e6)

    def upload_seconds(self, clients: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
        c = np.asarray(clients, dtype=np.int64)
        return self.latency_s[c] + np.asarray(nbytes, dtype=np.float64) * 8.0 / (self.uplink_mbps[c] * 1e6)

    def compute_seconds(self, clients: np.ndarray, samples: np.ndarray) -> np.ndarray:
        c = np.asarray(clients, dtype=np.int64)
        return np.asarray(samples, dtype=np.float64) / self.compute_sps[c]

    def completion_seconds(self, clients: np.ndarray, down_bytes: np.ndarray, samples: np.ndarray, up_bytes: np.ndarray) -> np.ndarray:
        """Vectorised `DeviceProfile.completion_seconds` for a cohort: download + compute + upload."""
        return (
            self.download_seconds(clients, down_bytes)
            + self.compute_seconds(clients, samples)
            + self.upload_seconds(clients, up_bytes)
        )

    @classmethod
    def from_profiles(cls, profiles: list[DeviceProfile]) -> "Fleet":
        return cls(
            np.array([p.compute_sps for p in profiles], dtype=np.float64),
            np.array([p.uplink_mbps for p in profiles], dtype=np.float64),
            np.array([p.downlink_mbps for p in profiles], dtype=np.float64),
            np.array([p.latency_s for p in profiles], dtype=np.float64),
        )


FLAKY_DROPOUT = 0.3


def make_fleet(cfg: DevicesConfig, num_clients: int, seed: int) -> Fleet:
    """The fleet of a preset.

    - ``uniform``: every device is the configured one.
    - ``mixed_fleet``: log-normal compute speed and bandwidths around the configured
      median device (sigma = ``spread``; 1.0 spans roughly 50x between the 5th and
      95th percentiles: flagship phones to IoT sensors), latency log-normal too.
    - ``flaky``: ``mixed_fleet`` with diurnal availability and 30% mid-round dropout
      (each overridable with ``availability`` and ``dropout``).
    Then ``slow_fraction`` of the devices (seeded) are made ``slow_factor`` times slower.
    Memory (``memory_mb``): the configured value on ``uniform``, log-normal around it
    (sigma = ``spread``) otherwise, drawn from a stream of its own.
    """
    n = num_clients
    rng = np.random.default_rng([seed, 0xDE71CE])
    if cfg.profile == "uniform":
        fleet = Fleet(
            np.full(n, cfg.compute_sps),
            np.full(n, cfg.uplink_mbps),
            np.full(n, cfg.downlink_mbps),
            np.full(n, cfg.latency_s),
        )
    else:
        s = cfg.spread
        fleet = Fleet(
            cfg.compute_sps * rng.lognormal(0.0, s, n),
            cfg.uplink_mbps * rng.lognormal(0.0, s, n),
            cfg.downlink_mbps * rng.lognormal(0.0, s, n),
            cfg.latency_s * rng.lognormal(0.0, s / 2, n),
        )
    flaky = cfg.profile == "flaky"
    dropout = cfg.dropout if cfg.dropout is not None else (FLAKY_DROPOUT if flaky else 0.0)
    if dropout > 0:
        fleet.dropout = np.full(n, dropout)
    availability = cfg.availability or ("diurnal" if flaky else "always")
    if availability == "diurnal":
        fleet.phase = rng.random(n)
        # Per-device online fraction around the mean (Beta with concentration 10).
        f = cfg.online_fraction
        fleet.online_frac = np.ones(n) if f >= 1 else rng.beta(10 * f, 10 * (1 - f), n)
        fleet.day_s = cfg.day_s
    # Memory from its own stream, so the presets' other draws are unchanged by it.
    mem_rng = np.random.default_rng([seed, 0x3E3041])
    if cfg.profile == "uniform":
        fleet.memory_mb = np.full(n, cfg.memory_mb)
    else:
        fleet.memory_mb = cfg.memory_mb * mem_rng.lognormal(0.0, cfg.spread, n)
    if cfg.slow_fraction > 0:
        slow = rng.random(n) < cfg.slow_fraction
        k = np.where(slow, cfg.slow_factor, 1.0)
        fleet.compute_sps = fleet.compute_sps / k
        fleet.uplink_mbps = fleet.uplink_mbps / k
        fleet.downlink_mbps = fleet.downlink_mbps / k
    return fleet
