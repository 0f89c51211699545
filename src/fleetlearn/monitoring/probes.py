"""Probe updates: synthetic updates with a known answer run through the round's
live parts every round, beside the real clients' updates and never aggregated
into the model, so a broken codec, aggregator or server optimizer is caught before
the model it produced ships.

Each round `ProbeHook` draws ``count`` probe updates from a seeded, known
distribution (Gaussian rows scaled to the round's median update norm) and checks
properties that hold for every correct part:

- **codec** (the run's live uplink chain, the one clients encode with): a payload decodes to
  the probe's dimension with finite values; a lossless chain returns the probe
  exactly; a lossy one keeps its direction (cosine > 0).  Count-sketch chains are
  summed in sketch space and are not probed.
- **aggregator**: ``count`` identical probe rows must aggregate to that row (every
  mean, median, trimmed mean, Krum, geometric median... agrees on a unanimous
  cohort); the plain mean must also equal the float64 weighted mean of distinct
  rows.  Stateful aggregators (MIFA) and central DP (which adds noise) are skipped.
- **server optimizer**: from a fresh state, a zero pseudo-gradient must leave the
  parameters unchanged; for ``sgd`` and ``momentum`` a step with ``g`` must give
  ``w + lr g``.

Results go to ``record.extra["probe_updates"]``; a failure also adds a critical ``probe_update``
alert to ``record.extra["alerts"]`` and, with ``rollback``, rejects the round
(``coordinator.restore``) like the guardrail.  Place it first among the hooks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..records import RoundRecord
from .detectors import ALERTS_KEY, Alert

PROBE_KEY = "probe_updates"  # not `probe_clients` (monitoring.probe_clients: devices with known data)


class ProbeHook:
    name = "probe_updates"

    def __init__(self, count: int = 10, rollback: bool = True, seed: int = 0, rtol: float = 1e-4):
        if count < 2:
            raise ValueError(f"probe_updates: need at least 2 probe updates, got {count}")
        self.count, self.rollback, self.seed, self.rtol = int(count), bool(rollback), int(seed), float(rtol)
        self.failures: list[dict[str, Any]] = []

    def _rows(self, r: int, d: int, scale: float) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, 0x960BE, r]).generate_state(1)[0]))
        rows = torch.randn(self.count, d, generator=g)
        return rows * (scale / rows.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # -- the checks ------------------------------------------------------------------------
    def check_codec(self, coordinator: Any, rows: torch.Tensor) -> list[str]:
        chain = getattr(coordinator, "uplink", None)
        if chain is None or getattr(coordinator, "sketch_mode", False):
            return []
        from ..compression.codec import RNG_SEED

        uplink = chain
        out = []
        for i, u in enumerate(rows):
            try:
                # The live chain, with a state of its own: its shared random stream is not consumed.
                payload, _ = chain.encode(u, {RNG_SEED: torch.tensor(self.seed + i, dtype=torch.int64)})
                dec = chain.decode(payload, dim=u.numel())
            except Exception as exc:  # any exception is the finding
                out.append(f"codec {uplink.spec!r}: probe {i} failed to round-trip ({type(exc).__name__}: {exc})")
                continue
            if dec.shape != u.shape or not bool(torch.isfinite(dec).all()):
                out.append(f"codec {uplink.spec!r}: probe {i} decoded to shape {tuple(dec.shape)} or non-finite values")
            elif not chain.lossy and not torch.equal(dec, u):
                out.append(f"codec {uplink.spec!r} is lossless but probe {i} came back changed (max error {float((dec - u).abs().max()):.3g})")
            elif chain.lossy and float(torch.dot(dec, u)) <= 0:
                out.append(f"codec {uplink.spec!r}: probe {i} decoded pointing away from itself (cosine <= 0)")
        return out

    def check_aggregator(self, coordinator: Any, rows: torch.Tensor) -> list[str]:
        agg = getattr(coordinator, "aggregator", None)
        privacy = getattr(coordinator, "privacy", None)
        if agg is None or getattr(agg, "needs_client_ids", False) or getattr(privacy, "central", None) is not None:
            return []
        n = rows.shape[0]
        w = torch.full((n,), 1.0 / n)
        out = []
        same = rows[0].expand(n, -1).contiguous()
        try:
            got = agg.aggregate(same, w)
            if not torch.allclose(got, rows[0], rtol=self.rtol, atol=self.rtol * float(rows[0].abs().max())):
                out.append(f"aggregator {agg.name}: {n} identical probe updates aggregated to something else (max error {float((got - rows[0]).abs().max()):.3g})")
        except ValueError:
            pass  # the rule's precondition does not hold for this many rows: nothing to say
        if getattr(agg, "name", "") == "mean":
            weights = torch.linspace(1.0, 2.0, n)
            weights = weights / weights.sum()
            want = (rows.double() * weights.double()[:, None]).sum(0)
            got = agg.aggregate(rows, weights).double()
            if not torch.allclose(got, want, rtol=self.rtol, atol=self.rtol * float(want.abs().max())):
                out.append(f"aggregator mean: the weighted mean of the probes is off by {float((got - want).abs().max()):.3g}")
        return out

    def check_server_optimizer(self, coordinator: Any, rows: torch.Tensor) -> list[str]:
        opt = getattr(coordinator, "server_optimizer", None)
        params = getattr(coordinator, "params", None)
        if opt is None or params is None:
            return []
        out = []
        fresh = opt.init(params)
        new, _ = opt.step(params, torch.zeros_like(params), fresh)
        if not torch.equal(new, params):
            out.append(f"server optimizer {getattr(opt, 'name', type(opt).__name__)}: a zero pseudo-gradient moved the model")
        if getattr(opt, "name", "") in ("sgd", "momentum"):
            g = rows[0]
            state = opt.init(params)
            new, _ = opt.step(params, g, state)
            want = params + opt.lr.value(state) * g
            if not torch.allclose(new, want, rtol=self.rtol, atol=1e-6):
                out.append(f"server optimizer {opt.name}: w + lr g is off by {float((new - want).abs().max()):.3g}")
        return out

    # -- the hook ------------------------------------------------------------------------------
    def after_round(self, record: RoundRecord, coordinator: Any) -> None:
        d = int(coordinator.dim)
        norms = [c.update_norm for c in record.clients if c.status == "accepted" and np.isfinite(c.update_norm)]
        scale = float(np.median(norms)) if norms else 1.0
        rows = self._rows(record.round, d, scale if scale > 0 else 1.0)
        failures = self.check_codec(coordinator, rows) + self.check_aggregator(coordinator, rows) + self.check_server_optimizer(coordinator, rows)
        info: dict[str, Any] = {"count": self.count, "ok": not failures, "failures": failures}
        if failures:
            alert = Alert("probe_update", "critical", "; ".join(failures), record.round, value=float(len(failures)))
            record.extra.setdefault(ALERTS_KEY, []).append(alert.to_dict())
            self.failures.append({"round": record.round, "failures": failures})
            if self.rollback and record.status == "ok":
                try:
                    info["restored_version"] = int(coordinator.restore(None, "probe update: " + failures[0]))
                except Exception as exc:
                    info["restore_error"] = str(exc)
        record.extra[PROBE_KEY] = info
