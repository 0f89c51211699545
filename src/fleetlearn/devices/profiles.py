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
    """Profiles of a whole population, one array per attribute."""

    compute_sps: np.ndarray
    uplink_mbps: np.ndarray
    downlink_mbps: np.ndarray
    latency_s: np.ndarray

    def __len__(self) -> int:
        return int(self.compute_sps.shape[0])

    def profile(self, client: int) -> DeviceProfile:
        return DeviceProfile(
            float(self.compute_sps[client]),
            float(self.uplink_mbps[client]),
            float(self.downlink_mbps[client]),
            float(self.latency_s[client]),
        )

    def completion_seconds(self, clients: np.ndarray, down_bytes: np.ndarray, samples: np.ndarray, up_bytes: np.ndarray) -> np.ndarray:
        """Vectorised `DeviceProfile.completion_seconds` for a cohort."""
        c = np.asarray(clients, dtype=np.int64)
        return (
            2.0 * self.latency_s[c]
            + np.asarray(down_bytes, dtype=np.float64) * 8.0 / (self.downlink_mbps[c] * 1e6)
            + np.asarray(samples, dtype=np.float64) / self.compute_sps[c]
            + np.asarray(up_bytes, dtype=np.float64) * 8.0 / (self.uplink_mbps[c] * 1e6)
        )

    @classmethod
    def from_profiles(cls, profiles: list[DeviceProfile]) -> "Fleet":
        return cls(
            np.array([p.compute_sps for p in profiles], dtype=np.float64),
            np.array([p.uplink_mbps for p in profiles], dtype=np.float64),
            np.array([p.downlink_mbps for p in profiles], dtype=np.float64),
            np.array([p.latency_s for p in profiles], dtype=np.float64),
        )


def make_fleet(cfg: DevicesConfig, num_clients: int, seed: int) -> Fleet:
    """The fleet of a preset.

    - ``uniform``: every device is the configured one.
    - ``mixed_fleet``: log-normal compute speed and bandwidths around the configured
      median device (sigma = ``spread``; 1.0 spans roughly 50x between the 5th and
      95th percentiles: flagship phones to IoT sensors), latency log-normal too.
    """
    n = num_clients
    if cfg.profile == "uniform":
        return Fleet(
            np.full(n, cfg.compute_sps),
            np.full(n, cfg.uplink_mbps),
            np.full(n, cfg.downlink_mbps),
            np.full(n, cfg.latency_s),
        )
    rng = np.random.default_rng([seed, 0xDE71CE])
    s = cfg.spread
    return Fleet(
        cfg.compute_sps * rng.lognormal(0.0, s, n),
        cfg.uplink_mbps * rng.lognormal(0.0, s, n),
        cfg.downlink_mbps * rng.lognormal(0.0, s, n),
        cfg.latency_s * rng.lognormal(0.0, s / 2, n),
    )
