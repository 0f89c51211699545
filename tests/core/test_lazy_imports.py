"""Heavy optional imports stay lazy: a client or a `fleetlearn token` never loads dp-accounting
(and scipy with it, ~3 s of start-up per process) unless it accounts privacy."""

from __future__ import annotations

import subprocess
import sys

from fleetlearn.lazy import LazyModule, lazy_module


def run_snippet(code: str) -> None:
    """`code` in a fresh interpreter (what it imported is its own): it must print ok."""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_a_lazy_module_imports_on_first_attribute_and_fails_loudly_when_missing():
    m = lazy_module("json")
    assert "not loaded yet" in repr(m)
    assert m.dumps([1]) == "[1]" and "loaded" in repr(m) and "not" not in repr(m)
    missing = LazyModule("fleetlearn_no_such_module_xyz")
    try:
        missing.anything
    except ModuleNotFoundError as exc:
        assert "fleetlearn_no_such_module_xyz" in str(exc)
    else:  # pragma: no cover - the assertion that would catch a silent stand-in
        raise AssertionError("a missing module must raise on first use")


def test_the_client_side_does_not_import_dp_accounting_until_it_accounts():
    code = (
        "import sys\n"
        "import fleetlearn.transport.grpc, fleetlearn.privacy, fleetlearn.cli\n"
        "assert 'dp_accounting' not in sys.modules, 'imported eagerly'\n"
        "from fleetlearn.privacy import PrivacyAccountant\n"
        "acc = PrivacyAccountant(delta=1e-5)\n"
        "acc.record_round(sampling_rate=0.1, noise_multiplier=1.0)\n"
        "assert acc.epsilon() > 0 and 'dp_accounting' in sys.modules\n"
        "print('ok')\n"
    )
    run_snippet(code)


def test_the_message_types_load_without_torch():
    # A tool that only reads or writes Tasks and Updates (a log reader, a gateway) need not
    # pay torch's two seconds of start-up; the learners still name FitConfig from their module.
    code = (
        "import sys\n"
        "from fleetlearn.messages import Task, Update, Dropout\n"
        "from fleetlearn.task_spec import FitConfig, TaskSpec\n"
        "assert 'torch' not in sys.modules, 'imported eagerly'\n"
        "t = Task(round=1, version=1, payload=b'x', codec='none', spec={'lr': 0.1, 'local_epochs': 2})\n"
        "assert t.spec.fit == FitConfig(lr=0.1, local_epochs=2), t.spec\n"
        "from fleetlearn.learners.base import FitConfig as F\n"
        "assert F is FitConfig\n"
        "print('ok')\n"
    )
    run_snippet(code)
