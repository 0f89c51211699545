"""Root load with regional aggregators vs a flat server, on 127.0.0.1.

    python benchmarks/topology.py                                  # 1000 clients, flat and 1, 2, 4 regions, 5 rounds
    python benchmarks/topology.py --clients 20 --rounds 2          # a quick check that it runs
    python benchmarks/topology.py --clients 1000 --regions 2 4 --dim 100000

Each topology is one `fleetlearn server` Coordinator (this process: `build_coordinator`
with `commands.server_transport`, as the CLI builds it) and:
- flat: N clients dial the server;
- R regions (`engine.region_aggregators = true`): R `fleetlearn aggregator`s (one
  process each: `build_aggregator` + `run_aggregator`, as the CLI runs them) with their
  own tokens at the root, and the N clients dial their region's aggregator (client id
  mod R).
The clients are `FleetClient` coroutines, one process per region (or one for flat),
each on its own TCP connection; their "training" is a seeded random delta of the
model's size (`SyntheticLearner`, the model's ParamSpec), so the numbers measure the
transport and aggregation, not local SGD.  The model is the config's default model
(`[model]` defaults) on `--dim` synthetic features (about 9,100 parameters at the default 60).

Reported per topology, for the root process only: bytes into the root per round (the
round record's uplink bytes: N updates flat, R region sums otherwise), wall seconds per
round (median over the rounds after the first) and the root's CPU seconds per round.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _swarm import run_clients  # noqa: E402

from fleetlearn.config import load_config  # noqa: E402
from fleetlearn.learners import ClientData  # noqa: E402
from fleetlearn.learners.base import FitResult, SingleClientLearner  # noqa: E402

CLASSES = 10


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(clients: int, rounds: int, dim: int, regions: int):
    engine = {"regions": regions, "region_aggregators": True} if regions else {}
    return load_config({
        "seed": 1,
        "data": {"dataset": "synthetic", "clients": clients + 1, "synthetic_dim": dim, "synthetic_classes": CLASSES,
                 "synthetic_iid": True},
        "server": {"rounds": rounds, "cohort": clients, "eval_every": rounds, "max_examples_ratio": 1000.0},
        "engine": engine,
        "monitoring": {"detectors": []},
    })


class SyntheticLearner(SingleClientLearner):
    """The run's model spec; 'training' is a seeded random delta (isolates transport cost)."""

    def __init__(self, spec):
        self.spec = spec

    def init_params(self, seed: int) -> torch.Tensor:
        return torch.zeros(self.spec.dim)

    def fit(self, params, data, hp, seed, correction=None, max_steps=None):
        delta = torch.from_numpy(np.random.default_rng(seed).standard_normal(params.shape[0], dtype=np.float32) * 1e-3)
        return FitResult(delta=delta, num_examples=data.num_examples, loss_before=1.0, loss_after=0.9, accuracy=0.5,
                         steps=1, samples=data.num_examples, compute_seconds=0.0)


def model_spec(cfg):
    from fleetlearn.transport.grpc.local_data import learner_from_config

    return learner_from_config(cfg, cfg.data.synthetic_dim, CLASSES).spec


def clients_process(cfg_json: str, address: str, tokens: list[str]) -> None:
    from fleetlearn.transport.grpc import Backoff, FleetClient

    torch.set_num_threads(1)
    cfg = load_config(json.loads(cfg_json))
    learner = SyntheticLearner(model_spec(cfg))
    data = ClientData(torch.zeros(8, cfg.data.synthetic_dim), torch.zeros(8, dtype=torch.long), torch.zeros(0, cfg.data.synthetic_dim),
                      torch.zeros(0, dtype=torch.long))

    run_clients(lambda i: FleetClient(address, tokens[i], learner, data, name=f"c{i}", backoff=Backoff(0.2, 2.0), give_up_after_s=120,
                                      train_in_thread=False, channel_options=[("grpc.use_local_subchannel_pool", 1)], seed=i), len(tokens))


def aggregator_process(cfg_json: str, region: int, address: str, state: str, root: str, token: str, clients: int) -> None:
    from fleetlearn.engine.aggregator import build_aggregator, run_aggregator

    torch.set_num_threads(1)
    cfg = load_config(json.loads(cfg_json))
    agg, transport = build_aggregator(cfg, region, address=address, state_dir=state, heartbeat_interval_s=1.0,
                                      min_clients=clients, wait_s=300.0)
    try:
        run_aggregator(agg, root, token, give_up_after_s=120)
    finally:
        transport.close(grace_s=1.0, linger_s=3.0)


def run(clients: int, rounds: int, dim: int, regions: int) -> dict:
    """One topology: `regions` = 0 for a flat server."""
    from fleetlearn.engine import build_coordinator
    from fleetlearn.transport.grpc import TokenStore, commands

    cfg = run_config(clients, rounds, dim, regions)
    cfg_json = json.dumps(cfg.model_dump(mode="json"))
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        state, root_state = Path(tmp) / "state", Path(tmp) / "root-state"
        with TokenStore.open(state) as store:
            toks = store.add_many([f"c{i}" for i in range(clients)])
            ids = {name: store.client_id(name) for name in toks}
        holder = {}

        def make_transport(learner, device):
            holder["t"] = commands.server_transport(cfg, learner.spec, "127.0.0.1:0", root_state if regions else state,
                                                    heartbeat_interval_s=1.0, learner=learner)
            return holder["t"]

        coordinator = build_coordinator(cfg, store=False, transport_factory=make_transport)
        transport = holder["t"]
        procs = []
        if regions:
            with TokenStore.open(root_state) as store:
                agg_toks = store.add_many([f"region{r}" for r in range(regions)])
            for r in range(regions):
                members = [toks[n] for n in toks if ids[n] % regions == r]
                address = f"127.0.0.1:{free_port()}"
                procs.append(ctx.Process(target=aggregator_process, args=(cfg_json, r, address, str(state), transport.address,
                                                                          agg_toks[f"region{r}"], len(members)), daemon=True))
                procs.append(ctx.Process(target=clients_process, args=(cfg_json, address, members), daemon=True))
        else:
            procs.append(ctx.Process(target=clients_process, args=(cfg_json, transport.address, list(toks.values())), daemon=True))
        for p in procs:
            p.start()
        coordinator.wait_for_clients = (regions or clients, 300.0)
        cpu, t_prev = [], [cpu_seconds()]

        def on_round(rec) -> None:
            now = cpu_seconds()
            cpu.append(now - t_prev[0])
            t_prev[0] = now

        try:
            coordinator.run(on_round=on_round)
            transport.finish()
        finally:
            transport.close(grace_s=1.0, linger_s=5.0)
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
    recs = coordinator.records
    later = recs[1:] or recs
    return {
        "topology": f"{regions} regions" if regions else "flat",
        "clients": clients,
        "dim": coordinator.dim,
        "rounds": len(recs),
        "ok_rounds": sum(r.status == "ok" for r in recs),
        "accepted_per_round": [r.accepted for r in recs],
        "root_bytes_in_per_round": int(statistics.median(r.uplink_bytes for r in later)),
        "client_bytes_in_per_round": int(statistics.median(r.extra.get("hierarchy_client_uplink_bytes", r.uplink_bytes) for r in later)),
        "seconds_per_round": float(statistics.median(r.wall_seconds for r in later)),
        "root_cpu_s_per_round": float(statistics.median(cpu[1:] or cpu)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dim", type=int, default=60, help="synthetic features, the model's input size (default 60)")
    ap.add_argument("--regions", type=int, nargs="*", default=[1, 2, 4], help="regional topologies to run (besides flat)")
    ap.add_argument("--no-flat", action="store_true", help="skip the flat server")
    args = ap.parse_args()
    for regions in ([] if args.no_flat else [0]) + list(args.regions):
        t0 = time.perf_counter()
        out = run(args.clients, args.rounds, args.dim, regions)
        out["total_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
