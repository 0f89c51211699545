"""Seeded fuzz of malformed configs: every section, CLI overrides and the Python API.

    python benchmarks/fuzz_config.py                          # 1200 build cases + 30 one-round runs, seed 0
    python benchmarks/fuzz_config.py --cases 300 --runs 8 --seed 3 --timeout 20
    python benchmarks/fuzz_config.py --json                    # one JSON line with the counts

Each case is a small base job (digits, 10 clients, cohort 5, 1 round, 1 local epoch)
with one to three keys set to a hostile value (inf, nan, 1e30, 2^64, -1, wrong types,
huge sizes, bad codec chains, bad import paths, factories that raise or return the
wrong thing, unknown keys, deep nesting ...), given through one of four channels:

  dict      fleetlearn.load_config(dict) then the run is built (no training)
  set       load_config(None, ["section.key=value", ...]) (the CLI's --set) then built
  copy      a valid RunConfig changed with model_copy(update=...) (skips pydantic), built
  run       `fleetlearn run --set ... --json` (cli.main), or fleetlearn.run(dict), one round

Every case runs in its own forked process with a wall-clock limit, so a native abort,
a hang or an exit() cannot take the fuzz down.  Outcomes:

  refused     a fleetlearn.FleetlearnError (ConfigError, DataError, RunFailedError), or
              the CLI exited 2 (bad input) / 1 (every round failed) with one error line
  accepted    built (or ran with at least one round that did not fail, exit 0)
  traceback   any other exception, or a traceback printed by the CLI      (must be 0)
  failed_ok   a run that exited 0 although every round failed              (must be 0)
  hang        the case ran past --timeout                                   (must be 0)
  crash       the process died by a signal (a native abort)                 (must be 0)

The exit status is 1 when any of the must-be-0 counts is not 0.  `unnamed` counts
refusals whose message names none of the keys the case set (reported, not fatal: a
refusal may rightly name the other key of a conflict).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # forked cases: no OpenMP pool inherited half-made

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))  # `fuzz_config:...` import paths name the factories below

BASE = {
    "data": {"clients": 10},
    "server": {"rounds": 1, "cohort": 5},
    "client": {"local_epochs": 1},
    "monitoring": {"debug": False},
}

BAD_FAILS = ("traceback", "failed_ok", "hang", "crash")


# -- factories the fuzz names by import path ----------------------------------------------
def data_ok(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(60, 4)).astype("float32"), "y": rng.integers(0, 3, 60)}


def data_raises(seed):
    raise RuntimeError("the dataset server is down")


def data_exits(seed):
    sys.exit(0)


def data_huge_values(seed):
    out = data_ok(seed)
    out["x"] = out["x"].astype("float64") * 1e300
    return out


def data_huge_labels(seed):
    out = data_ok(seed)
    out["y"][0] = 100_000
    return out


def data_wrong_shape(seed):
    return {"x": [[1.0, 2.0], [3.0]], "y": [0, 1]}


def data_not_dict(seed):
    return [1, 2, 3]


def model_ok(num_features, num_classes, **kwargs):
    import torch

    return torch.nn.Linear(num_features, num_classes)


def model_raises(num_features, num_classes, **kwargs):
    raise ValueError("no such architecture")


def model_wrong_shape(num_features, num_classes, **kwargs):
    import torch

    return torch.nn.Linear(num_features, num_classes + 3)


def model_float64(num_features, num_classes, **kwargs):
    import torch

    return torch.nn.Linear(num_features, num_classes).double()


def model_not_module(num_features, num_classes, **kwargs):
    return "a model"


def model_no_params(num_features, num_classes, **kwargs):
    import torch

    return torch.nn.Identity()


def model_exits(num_features, num_classes, **kwargs):
    raise SystemExit(3)


NOT_CALLABLE = 5

# -- hostile values -----------------------------------------------------------------------
INF, NAN = math.inf, math.nan
NUMBERS = [0, -1, 1, 2, 3, 0.5, 0.999, 1.5, 1e-9, 1e-300, 1e6, 1e9, 1e30, 1e300, 2**31, 2**63, 2**64, -(2**63), 10**30,
           INF, -INF, NAN, True, "abc", "", None, [], {}, [1, 2], {"a": 1}]
STRINGS = ["", " ", "x", "none", "auto", "a" * 300, "\x00", "pkg:fn", "sys:exit", "os:getcwd", "os.path:join", "no_such_mod:f",
           "fuzz_config:NOT_CALLABLE", "fuzz_config:missing", "1:2", ":", "a b", "127.0.0.1", "::1", "localhost", "/dev/null",
           "/nonexistent/dir", 5, 1.5, None, True, ["a"], {"a": "b"}]
CHAINS = ["none", "", "q8", "q4:stochastic", "q2", "fp16", "bf16", "sign", "zstd", "q8 | zstd", "topk:0.1", "topk:0.1 | q8",
          "ef | topk:0.1 | q8", "randk:0.05", "sketch:100", "sketch:1000000000", "sketch:1e9", "sketch:0.05,cols=0.2",
          "topk:0", "topk:-1", "topk:1e9", "topk:2.0", "topk:0.1,block=16", "topk:0.1,block=0", "q8 | q8", "ef | ef | q8",
          "zstd | q8", "q8 | zstd | zstd", "topk:0.1 | topk:0.2", "|", "q8 ||", "bogus", "q3", "topk:nan", "topk:inf",
          "ef", "ef | sketch:50", 7, None, ["q8"]]
LISTS = [[], [0], [-1], [1], [1e9], [2**63], [10**30], [8, 8], [128, 64, 32], ["a"], [[1]], [1.5], [INF], [NAN], [True],
         None, 5, "x", [1] * 200]
DICTS = [{}, {"a": 1}, {"embed": 4}, {"embed": -1}, {"embed": 1e9}, {"layers": 2}, [], "x", 5, None, {"a": {"b": {"c": [1]}}}]
FLOAT_LISTS = [[1.0], [0.5, 1.0], [1.0, 1.0], [0.0, 1.0], [2.0], [INF], [NAN], [], ["a"], [1.0, 0.25, 0.5], None]

SPECIAL: dict[str, list] = {
    "data.dataset": ["digits", "synthetic", "fashion_mnist", "sotu", "imagenet", "sys:exit", "os:getcwd", "builtins:print",
                     "fuzz_config:data_ok", "fuzz_config:data_raises", "fuzz_config:data_exits", "fuzz_config:data_huge_values",
                     "fuzz_config:data_huge_labels", "fuzz_config:data_wrong_shape", "fuzz_config:data_not_dict",
                     "fuzz_config:NOT_CALLABLE", "no_such_module_x:f", "fuzz_config:missing", 5, None, ""],
    "model.name": ["mlp", "logistic", "char_gru", "char_lstm", "resnet", "sys:exit", "builtins:print", "fuzz_config:model_ok",
                   "fuzz_config:model_raises", "fuzz_config:model_wrong_shape", "fuzz_config:model_float64",
                   "fuzz_config:model_not_module", "fuzz_config:model_no_params", "fuzz_config:model_exits",
                   "fuzz_config:NOT_CALLABLE", "no_such_module_x:f", 5, None],
    "server.byzantine_f": [0, 1, 2, 4, 100, -1, 10**30, None, 1.5],
    "server.krum_m": [1, 3, 5, 9, 100, 0, None],
    "privacy.secagg_threshold": [0.5, 1.0, 1.5, 2, 3, 4, 5, 50, 1e9, 0, -1, None],
    "privacy.noise_multiplier": [0.0, 1e-9, 1e-4, 0.05, 0.1, 1.0, 1e9, -1.0, INF],
    "monitoring.prometheus_host": ["127.0.0.1", "no.such.host.invalid", "", "256.1.1.1", "::1", "a b", 5],
    "monitoring.prometheus_port": [0, 1, 80, 65535, 65536, -1, 10**30, None],
    "store.root": ["/dev/null", "/proc/nope", "/nonexistent/sub", "", 5],
    "engine.threads": [0, 1, 2, "auto", 1e6, 10**30, -1, 512, 513, "many", 1.5],
    "client.batch_size": [1, 8, 1e9, 2**40, 0, -1, 1.5],
    "model.hidden": [[8], [1e9], [10**6, 10**6], [0], [], [8, 8, 8], [2**63], "x"],
}

# Keys whose large values are fine but slow (or that start a Ray cluster): mutated only in build cases, never in runs.
WORK_KEYS = {"server.rounds", "client.local_epochs", "client.local_steps", "data.clients", "server.cohort", "distill.steps",
             "distill.student_steps", "personalization.finetune_steps", "personalization.ditto_epochs", "server.gm_max_iter",
             "server.cc_iters", "data.examples_per_client", "data.text_max_chars", "server.eval_clients", "data.synthetic_dim",
             "data.synthetic_classes", "server.concurrency", "server.buffer_size", "server.clusters", "data.groups",
             "server.mifa_max_clients", "monitoring.probe_updates", "data.text_speakers", "server.min_replies", "distill.batch_size",
             "engine.backend", "engine.address", "engine.ray_workers"}  # and no Ray cluster per one-round run


def schema() -> dict[str, object]:
    """{"section.key": annotation} for every key of every section."""
    from fleetlearn.config import RunConfig

    out: dict[str, object] = {}
    for name, field in RunConfig.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            for key, sub in ann.model_fields.items():
                out[f"{name}.{key}"] = sub.annotation
        else:
            out[name] = ann
    return out


def values_for(key: str, ann: object) -> list:
    if key in SPECIAL:
        return SPECIAL[key] + NUMBERS[::5]
    text = str(ann)
    if "Literal" in text:
        import typing

        lits: list = []
        stack = [ann]
        while stack:
            a = stack.pop()
            if typing.get_origin(a) is typing.Literal:
                lits += list(typing.get_args(a))
            else:
                stack += list(typing.get_args(a))
        return lits + ["bogus", "", 5, None]
    if key.startswith("compression.") and key in ("compression.uplink", "compression.downlink"):
        return CHAINS
    if key == "compression.ladder":
        return [[c] for c in CHAINS[:12]] + [["q8", "q8"], ["none", "topk:0.1"], [], ["bogus"], "q8", None]
    if "dict" in text:
        return DICTS
    if "list[float]" in text:
        return FLOAT_LISTS
    if "list" in text:
        return LISTS + [[c] for c in ("q8", "divergence", "finite", "bogus", "server.rounds=2", "client.lr=inf")]
    if "bool" in text and "int" not in text and "float" not in text:
        return [True, False, 0, 1, "yes", "true", None, 2, [], INF]
    if "str" in text and "int" not in text and "float" not in text:
        return STRINGS
    return NUMBERS


def toml_value(v) -> str:
    """A value as the TOML text of a --set override."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    return '""'  # None has no TOML spelling: an empty string instead


def nested(depth: int):
    v: object = 1
    for _ in range(depth):
        v = [v]
    return v


def make_cases(n: int, runs: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    keys = schema()
    names = sorted(keys)
    cases: list[dict] = []

    def mutation(for_run: bool) -> tuple[str, object]:
        while True:
            key = rng.choice(names)
            if for_run and key in WORK_KEYS:
                continue
            return key, rng.choice(values_for(key, keys[key]))

    # Every key at least once (channel "dict"), then random cases over the four channels.
    for key in names:
        cases.append({"channel": "dict", "muts": [(key, rng.choice(values_for(key, keys[key])))]})
    raw_sets = ["server.rounds", "=3", "server.rounds=[[[[", "a.b.c.d=1", "server.rounds=1e999", "server=3",
                "server.rounds.x=1", f"model.kwargs={{a = {toml_value(nested(40))}}}", "data.clients=10 # c",
                "privacy.mode=central", "canary.set=[\"server.rounds=2\"]", "canary.set=[\"data.clients=3\"]", "nope.key=1",
                f"model.hidden={toml_value(nested(300))}", "seed=-1", "seed=1e30", "name=5"]
    for item in raw_sets:
        cases.append({"channel": "set", "muts": [], "raw": [item]})
    cases.append({"channel": "dict", "muts": [], "whole": {"server": {"rounds": 1}, "model": {"kwargs": {"a": nested(500)}}}})
    cases.append({"channel": "dict", "muts": [], "whole": ["not", "a", "dict"]})
    cases.append({"channel": "dict", "muts": [], "whole": {**BASE, "bogus_section": {}}})
    while len(cases) < n:
        channel = rng.choice(("dict", "dict", "set", "set", "copy"))
        k = rng.choice((1, 1, 1, 2, 3))
        cases.append({"channel": channel, "muts": [mutation(False) for _ in range(k)]})
    for _ in range(runs):
        k = rng.choice((1, 1, 2))
        cases.append({"channel": "run", "api": rng.random() < 0.3, "muts": [mutation(True) for _ in range(k)]})
    for i, c in enumerate(cases):
        c["id"] = i
    return cases


# -- one case ------------------------------------------------------------------------------
def _config_dict(case: dict) -> dict:
    if "whole" in case:
        return case["whole"]
    data = json.loads(json.dumps(BASE))
    for key, value in case["muts"]:
        node = data
        *sections, leaf = key.split(".")
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = value
    return data


def _overrides(case: dict) -> list[str]:
    if "raw" in case:
        base = [f"{s}.{k}={toml_value(v)}" for s, sec in BASE.items() for k, v in sec.items()]
        return base + case["raw"]
    base = [f"{s}.{k}={toml_value(v)}" for s, sec in BASE.items() for k, v in sec.items()]
    return base + [f"{k}={toml_value(v)}" for k, v in case["muts"]]


def run_case(case: dict, workdir: str) -> dict:
    """The outcome of one case (in the forked child)."""
    import fleetlearn
    from fleetlearn.api import build
    from fleetlearn.config import RunConfig, load_config

    os.chdir(workdir)
    channel = case["channel"]
    try:
        if channel == "dict":
            cfg = load_config(_config_dict(case))
            build(cfg, store=False)
            return {"outcome": "accepted"}
        if channel == "set":
            cfg = load_config(None, _overrides(case))
            build(cfg, store=False)
            return {"outcome": "accepted"}
        if channel == "copy":
            cfg = load_config(BASE)
            for key, value in case["muts"]:
                *sections, leaf = key.split(".")
                if sections:
                    sec = getattr(cfg, sections[0])
                    cfg = cfg.model_copy(update={sections[0]: sec.model_copy(update={leaf: value})})
                else:
                    cfg = cfg.model_copy(update={leaf: value})
            build(load_config(cfg), store=False)
            return {"outcome": "accepted"}
        if case.get("api"):
            data = _config_dict(case)
            summary = fleetlearn.run(data, store=False)
            return {"outcome": "accepted", "rounds": summary.rounds}
        return _run_cli(case, workdir)
    except fleetlearn.FleetlearnError as exc:
        return {"outcome": "refused", "message": str(exc)[:500], "type": type(exc).__name__}
    except BaseException as exc:  # noqa: BLE001 - the point: anything else is a finding
        return {"outcome": "traceback", "message": f"{type(exc).__name__}: {exc}"[:500],
                "where": traceback.format_exc(limit=-3)[-1500:]}


def _run_cli(case: dict, workdir: str) -> dict:
    from fleetlearn import cli

    args = ["run", "--json", "--quiet", "--runs-dir", os.path.join(workdir, "runs")]
    for item in _overrides(case):
        args += ["--set", item]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(args)
    stdout, stderr = out.getvalue(), err.getvalue()
    if "Traceback" in stdout or "Traceback" in stderr:
        return {"outcome": "traceback", "message": stderr[-800:]}
    if rc == 2 or rc == 1:
        if not stderr.startswith("fleetlearn: error:"):
            return {"outcome": "traceback", "message": f"exit {rc} without an error line: {stderr[-500:]}"}
        return {"outcome": "refused", "message": stderr.strip()[:500], "type": f"exit {rc}"}
    if rc != 0:
        return {"outcome": "traceback", "message": f"exit {rc}: {stderr[-500:]}"}
    summary = json.loads(stdout.strip().splitlines()[-1])
    if summary["rounds"] > 0 and summary["failed_rounds"] == summary["rounds"]:
        return {"outcome": "failed_ok", "message": "exit 0 with every round failed"}
    return {"outcome": "accepted", "rounds": summary["rounds"]}


def _child(case: dict, workdir: str, wfd: int) -> None:
    try:
        res = run_case(case, workdir)
    except BaseException as exc:  # noqa: BLE001
        res = {"outcome": "traceback", "message": repr(exc)[:500]}
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # engine.backend = "ray" started a local cluster: stop it
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
    payload = json.dumps(res, default=str).encode()
    with os.fdopen(wfd, "wb") as w:
        w.write(payload)
    os._exit(0)



def _drain(rfd: int, buf: bytearray) -> None:
    """Append what a child wrote to its (non-blocking) pipe so far."""
    try:
        while True:
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            buf += chunk
    except BlockingIOError:
        pass

def run_all(cases: list[dict], timeout: float, workers: int, run_timeout: float) -> list[dict]:
    """Every case in its own forked process, `workers` at a time."""
    import fleetlearn  # noqa: F401 - imported once, before forking
    import fleetlearn.api  # noqa: F401
    import fleetlearn.cli  # noqa: F401
    import fleetlearn.engine  # noqa: F401
    import importlib

    for mod in ("fleetlearn.aggregation.mifa", "fleetlearn.privacy.secagg", "fleetlearn.privacy.telemetry", "fleetlearn.learners.heterofl",
                "fleetlearn.learners.distill", "fleetlearn.learners.clustered", "fleetlearn.learners.text_models", "fleetlearn.clustering",
                "fleetlearn.client.personalization", "fleetlearn.data.text", "fleetlearn.engine.fedbuff", "fleetlearn.engine.hierarchy",
                "fleetlearn.ops", "sqlalchemy", "prometheus_client"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
    from fleetlearn.api import build
    from fleetlearn.config import load_config

    build(load_config(BASE), store=False)  # warm: what every child would otherwise import and initialise again

    results: list[dict] = [None] * len(cases)  # type: ignore[list-item]
    pending = list(range(len(cases)))[::-1]
    live: dict[int, tuple[int, int, float, str, bytearray]] = {}  # pid -> (case, rfd, deadline, dir, buf)
    root = tempfile.mkdtemp(prefix="fuzz_config_")
    while pending or live:
        while pending and len(live) < workers:
            i = pending.pop()
            workdir = tempfile.mkdtemp(dir=root)
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:  # child
                os.close(rfd)
                try:
                    _child(cases[i], workdir, wfd)
                finally:
                    os._exit(1)
            os.close(wfd)
            os.set_blocking(rfd, False)
            limit = run_timeout if cases[i]["channel"] == "run" else timeout
            live[pid] = (i, rfd, time.monotonic() + limit, workdir, bytearray())
        time.sleep(0.005)
        for pid, (i, rfd, deadline, workdir, buf) in list(live.items()):
            _drain(rfd, buf)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    os.close(rfd)
                    del live[pid]
                    results[i] = {"outcome": "hang", "message": f"still running after {deadline and (run_timeout if cases[i]['channel'] == 'run' else timeout)} s"}
                continue
            _drain(rfd, buf)
            os.close(rfd)
            del live[pid]
            if os.WIFSIGNALED(status):
                results[i] = {"outcome": "crash", "message": f"killed by signal {os.WTERMSIG(status)}"}
            else:
                try:
                    results[i] = json.loads(bytes(buf).decode())
                except ValueError:
                    results[i] = {"outcome": "crash", "message": f"exit status {os.WEXITSTATUS(status)} without a result"}
    for r, c in zip(results, cases):
        r["case"] = c
    return results


def _named(result: dict) -> bool:
    msg = result.get("message", "")
    keys = [k for k, _ in result["case"].get("muts", [])]
    if not keys:
        return True
    return any(k in msg or k.split(".")[-1] in msg for k in keys)


def summarise(results: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    channels: dict[str, int] = {}
    for r in results:
        channels[r["case"]["channel"]] = channels.get(r["case"]["channel"], 0) + 1
    refused = [r for r in results if r["outcome"] == "refused"]
    return {
        "cases": len(results),
        "channels": channels,
        "sections": sorted({k.split(".")[0] for r in results for k, _ in r["case"].get("muts", [])}),
        **{k: counts.get(k, 0) for k in ("accepted", "refused", *BAD_FAILS)},
        "unnamed": sum(not _named(r) for r in refused),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=1200, help="cases that validate and build (no training)")
    p.add_argument("--runs", type=int, default=30, help="cases that run one round (CLI or API)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per build case")
    p.add_argument("--run-timeout", type=float, default=90.0, help="seconds per one-round run")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON line with the counts")
    p.add_argument("--show", type=int, default=5, help="findings of each kind to print")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    results = run_all(make_cases(a.cases, a.runs, a.seed), a.timeout, a.workers, a.run_timeout)
    s = summarise(results)
    s["seconds"] = round(time.perf_counter() - t0, 1)
    if a.json:
        print(json.dumps(s))
    else:
        print(f"{s['cases']} cases {s['channels']} over sections {', '.join(s['sections'])} in {s['seconds']} s")
        print("  " + "  ".join(f"{k} {s[k]}" for k in ("accepted", "refused", *BAD_FAILS, "unnamed")))
    for kind in BAD_FAILS:
        for r in [r for r in results if r["outcome"] == kind][: a.show]:
            print(f"{kind}: case {r['case']['id']} {r['case']['channel']} {r['case'].get('muts') or r['case'].get('raw') or ''}: "
                  f"{r.get('message', '')}\n{r.get('where', '')}", file=sys.stderr)
    return 1 if any(s[k] for k in BAD_FAILS) else 0


if __name__ == "__main__":
    sys.exit(main())
