"""Probe clients: devices with a known answer, checked after the full path a real update takes.

A probe client is a normal client device (`fleetlearn.client.Device`; over gRPC a
`fleetlearn client --probe` process, in the simulation `[probes] clients` extra devices)
whose local data is `fleetlearn.client.probe.probe_data`: a seeded sample the server can draw
too.  Each round:

- **select** (`ProbeSelector`): every available probe joins the cohort beside the clients the
  run's selector draws from the other clients (the probes never take a real client's seat, and
  the selector, its sampling rate and what it learns see real clients only);
- **train and send**: the probe trains and encodes like any client, and its update crosses the
  transport (the wire, over gRPC);
- **take** (`ProbeClients`, a diverter of the intake, `engine/intake.py`): after the decoder
  and the validators, the update goes to the check, never to aggregation;
- **check**: the server runs the same local training on its own copy of the device (same
  model payload, data, seed, codec chain, codec state and random stream) and decodes what its
  copy would have sent, so a lossy or stochastic codec is reproduced, not bounded.  The update
  passes when ``||got - want|| <= tolerance * ||want||``; what remains is float noise (a
  cohort trained as one batch against the server's single run, a rounding flip of a lossy
  codec), about 1e-7 of the norm, against a default tolerance of 0.05.  A refusal on the way
  in (decoder or validator), a claimed example count other than the probe's, or an update
  outside the bound is a failure;
- **alert** (`after_round`, a round hook before monitoring's): ``record.extra["probe_clients"]``
  (selected, checked, failed, the largest relative error) and, on a failure, a critical
  ``probe_client`` alert in ``record.extra["alerts"]`` (Prometheus counts it).  The round's
  ``selected`` counts real clients only.

Limits: the check's device copy keeps its own codec state (error-feedback residuals), so a
probe that misses rounds, or a resumed run, may drift from it by up to that residual.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..client import Device
from ..client.probe import probe_chain, probe_data
from ..messages import Dropout, Task, Update
from ..records import ClientRecord, RoundRecord
from ..selection.base import Selector
from ..transport.base import Reply
from ..transport.simulation import client_seed
from .detectors import ALERTS_KEY, Alert

PROBE_CLIENTS_KEY = "probe_clients"
PROBE_STATUS = "probe"  # a probe client's ClientRecord.status


class ProbeClients:
    """The server side of probe clients: who they are (`roster`), the intake diverter that
    takes their updates, the check, and the round hook that reports it.

    `roster()` gives the probe clients the transport knows (gRPC: the clients that announced
    the "probe" feature; the simulation: its probe devices).  `decoder` is the run's
    (engine.intake), `device_seed` the seed the probes' devices use (the simulation's device:
    the run seed; `fleetlearn client`: 0)."""

    name = "probe_clients"
    status = PROBE_STATUS

    def __init__(self, learner, uplink, downlink, decoder, roster: Callable[[], Sequence[int]], *, num_features: int,
                 num_classes: int, examples: int = 32, tolerance: float = 0.05, device_seed: int = 0):
        self.device = Device(learner, uplink, downlink, seed=device_seed)  # the server's own copy of a probe's device
        self.decoder = decoder
        self.roster = roster
        self.num_features, self.num_classes, self.examples = int(num_features), int(num_classes), int(examples)
        self.tolerance = float(tolerance)
        self._task: Task | None = None
        self._ids: set[int] = set()  # this round's probes
        self._results: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []  # every failure of the run (round, client, reason)

    # -- selection -------------------------------------------------------------------------
    def split(self, available: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(real clients, probe clients) of `available`."""
        ids = np.asarray(available, dtype=np.int64)
        probes = np.intersect1d(ids, np.asarray(list(self.roster()), dtype=np.int64))
        return np.setdiff1d(ids, probes), probes

    def select(self, probes: np.ndarray) -> list[int]:
        self._ids = {int(c) for c in probes}
        return sorted(self._ids)

    # -- the intake diverter ---------------------------------------------------------------------
    def open_round(self, task: Task) -> None:
        self._task = task
        self._results = []

    def claims(self, client_id: int) -> bool:
        return int(client_id) in self._ids

    def take(self, update: Update, vec: torch.Tensor | None, reason: str | None, rec: ClientRecord) -> None:
        why, error = self.check(update, vec, reason)
        rec.reason = f"probe: {why}" if why else "probe: update as predicted"
        self._results.append({"client": int(update.client_id), "ok": why is None, "error": error, "reason": why})

    # -- the check -----------------------------------------------------------------------------
    def expected(self, task: Task, client: int) -> torch.Tensor:
        """The update the probe's device should have sent, as the server decodes it."""
        data = probe_data(task.spec.seed, task.round, client, self.num_features, self.num_classes, self.examples)
        (update,) = self.device.run(task, [client], [data], [client_seed(task.spec.seed, task.round, client)])
        if isinstance(update, Dropout):
            raise ValueError(update.reason)
        return self.decoder.decode(update)

    def check(self, update: Update, vec: torch.Tensor | None, reason: str | None) -> tuple[str | None, float]:
        """(why the update is wrong or None, its relative error)."""
        cid = int(update.client_id)
        if reason is not None:
            return f"refused on the way in ({reason})", math.nan
        task = self._task
        if task is None or update.round != task.round:
            return f"no task of round {update.round} to check it against", math.nan
        if update.num_examples != self.examples:
            return f"claims {update.num_examples} examples; a probe trains on {self.examples}", math.nan
        try:
            want = self.expected(task, cid)
        except Exception as exc:  # the server's own run of the probe: any failure is the finding
            return f"the server could not compute its expected update ({type(exc).__name__}: {exc})", math.nan
        scale = float(torch.linalg.vector_norm(want))
        err = float(torch.linalg.vector_norm(vec.float() - want))
        rel = err / scale if scale > 0 else err
        if not math.isfinite(rel) or rel > self.tolerance:
            return f"probe client {cid}: its update is off the predicted one by {rel:.3g} of its norm (allowed {self.tolerance:.3g})", rel
        return None, rel

    # -- the round hook ----------------------------------------------------------------------------
    def after_round(self, record: RoundRecord, coordinator: Any = None) -> None:
        selected = len(self._ids)
        if selected:
            record.selected = max(0, record.selected - selected)  # the cohort is the real clients
            failed = [r for r in self._results if not r["ok"]]
            errors = [r["error"] for r in self._results if math.isfinite(r["error"])]
            checked = {r["client"] for r in self._results}
            record.extra[PROBE_CLIENTS_KEY] = {
                "selected": selected, "checked": len(self._results), "ok": not failed,
                "failed": [{"client": r["client"], "reason": r["reason"]} for r in failed],
                "missing": sorted(self._ids - checked), "max_error": max(errors) if errors else None,
            }
            if failed:
                alert = Alert("probe_client", "critical", "; ".join(r["reason"] for r in failed), record.round,
                              clients=[r["client"] for r in failed], value=float(len(failed)))
                record.extra.setdefault(ALERTS_KEY, []).append(alert.to_dict())
                self.failures.extend({"round": record.round, "client": r["client"], "reason": r["reason"]} for r in failed)
        self._ids, self._results, self._task = set(), [], None


class ProbeSelector(Selector):
    """The run's selector over real clients, plus every available probe client."""

    def __init__(self, inner: Any, probes: ProbeClients):
        self.inner = inner
        self.probes = probes
        self._last = 0

    @property
    def name(self) -> str:  # type: ignore[override]
        return getattr(self.inner, "name", "selector")

    def select(self, available: Sequence[int], k: int, round: int, rng: np.random.Generator) -> list[int]:
        real, probes = self.probes.split(available)
        cohort = [int(c) for c in self.inner.select(real, min(k, len(real)), round, rng)] if len(real) else []
        extra = self.probes.select(probes)
        self._last = len(extra)
        return cohort + extra

    def inclusion(self, available: Sequence[int], k: int):
        real, _ = self.probes.split(available)
        return self.inner.inclusion(real, min(k, len(real)))

    def target(self, drawn: int, cohort: int, over_selection: float) -> int:
        """The inner selector's target for the real clients drawn, plus the probes (their
        checked updates count towards filling the round, engine.intake.collect)."""
        return self.inner.target(drawn - self._last, cohort, over_selection) + self._last

    @staticmethod
    def _real(record):
        return replace(record, clients=[c for c in record.clients if c.status != PROBE_STATUS])

    def observe(self, record) -> None:
        self.inner.observe(self._real(record))

    def restore(self, records) -> None:
        self.inner.restore([self._real(r) for r in records])


class ProbeTransport:
    """The simulation with `clients` probe devices, ids ``population .. population + clients - 1``:
    they train on the transport's own client device (the codec test hook: a copy of it with
    the broken chain) and reply at once; the rest of the cohort goes to the simulation."""

    def __init__(self, inner: Any, clients: int, num_features: int, num_classes: int, examples: int, tamper: str | None = None):
        self.inner = inner
        first = int(inner.population)
        self.ids = list(range(first, first + int(clients)))
        self.num_features, self.num_classes, self.examples = int(num_features), int(num_classes), int(examples)
        self.tamper = tamper
        self.probe_device = inner.device
        if tamper == "codec":
            self.probe_device = copy.copy(inner.device)  # same learner, states and seed: only the chain differs
            self.probe_device.uplink = probe_chain(inner.device.uplink, tamper)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def probe_clients(self) -> list[int]:
        return list(self.ids)

    def available(self, round: int) -> np.ndarray:
        return np.concatenate([np.asarray(self.inner.available(round), dtype=np.int64), np.asarray(self.ids, dtype=np.int64)])

    def dispatch(self, task: Task, cohort: Sequence[int]) -> Iterator[Reply]:
        mine = set(self.ids)
        probes = [int(c) for c in cohort if int(c) in mine]
        if probes:
            data = [probe_data(task.spec.seed, task.round, c, self.num_features, self.num_classes, self.examples, self.tamper)
                    for c in probes]
            seeds = [client_seed(task.spec.seed, task.round, c) for c in probes]
            for update in self.probe_device.run(task, probes, data, seeds):
                yield Reply(update, 0.0)
        yield from self.inner.dispatch(task, [c for c in cohort if int(c) not in mine])
