"""The one part registry (fleetlearn.parts), parts' own config keys with the old flat keys
still read, and the pair rules computed from capabilities (fleetlearn.compat)."""

from __future__ import annotations

import tomllib
import warnings

import pytest

from fleetlearn.aggregation import AGGREGATORS, SERVER_OPTIMIZERS, WEIGHTINGS
from fleetlearn.compression import CODECS
from fleetlearn.config import ConfigError, OldKeyNote, PrivacyConfig, load_config
from fleetlearn.engine import build_coordinator
from fleetlearn.engine.factory import build_selector, build_server_optimizer, build_weighting
from fleetlearn.parts import KINDS, find_part, get_part, names
from fleetlearn.privacy import PrivacySettings
from fleetlearn.selection import SELECTORS
from fleetlearn.validation import VALIDATORS

SMALL = {"data": {"clients": 12}, "model": {"hidden": [8]}, "server": {"rounds": 1, "cohort": 4}, "client": {"local_epochs": 1}}


def small(**server):
    return {**SMALL, "server": {**SMALL["server"], **server}}


def test_every_kind_has_its_built_ins_and_the_old_dicts_are_views():
    assert set(KINDS) == {"aggregator", "codec", "selector", "weighting", "server_optimizer", "validator", "dataset", "transport"}
    assert names("selector") == ["random", "poisson", "oort"]
    assert names("transport") == ["simulation", "ray", "grpc"]  # grpc: `fleetlearn server`, registered for its capabilities
    assert names("transport", listed_only=True) == ["simulation", "ray"]
    assert names("dataset") == ["digits", "synthetic", "fashion_mnist", "sotu", "spam_assassin"]
    for view, kind in ((SELECTORS, "selector"), (WEIGHTINGS, "weighting"), (SERVER_OPTIMIZERS, "server_optimizer"),
                       (VALIDATORS, "validator"), (CODECS, "codec"), (AGGREGATORS, "aggregator")):
        assert all(view[n] is find_part(kind, n).obj for n in view)
    assert "mifa" in names("aggregator") and "mifa" not in AGGREGATORS  # built from the run's size
    assert get_part("aggregator", "mean").capabilities >= {"linear", "bounded_sensitivity"}
    assert "needs_individual_updates" in get_part("aggregator", "median").capabilities
    with pytest.raises(ConfigError, match=r"server.selector = 'x': unknown selector; allowed: random, poisson, oort"):
        get_part("selector", "x")


def test_a_part_takes_its_own_keys_by_name_and_they_build_it():
    cfg = load_config(small(selector={"name": "oort", "epsilon": 0.3, "alpha": 1.0},
                            optimizer={"name": "adam", "beta1": 0.5, "tau": 0.01}, server_lr=0.1,
                            weighting={"name": "distance", "mode": "cosine"}))
    oort = build_selector(cfg, 12)
    assert (oort.epsilon, oort.alpha) == (0.3, 1.0)
    opt = build_server_optimizer(cfg)
    assert (type(opt).__name__, opt.server_lr, opt.beta1, opt.beta2, opt.tau) == ("ServerAdam", 0.1, 0.5, 0.99, 0.01)
    w = build_weighting(cfg)
    assert (w.mode, w.temperature) == ("cosine", 1.0)
    # written out: only the keys that differ from the part's defaults, in the part's table
    server = tomllib.loads(cfg.to_toml())["server"]
    assert server["selector"] == {"name": "oort", "epsilon": 0.3, "alpha": 1.0}
    assert server["optimizer"] == {"name": "adam", "beta1": 0.5, "tau": 0.01}
    assert load_config(tomllib.loads(cfg.to_toml())).to_dict() == cfg.to_dict()
    # a plain name is written as the name: configs without part keys keep their TOML
    assert tomllib.loads(load_config(small()).to_toml())["server"]["selector"] == "auto"


def test_a_sub_table_and_an_inline_table_are_the_same():
    a = load_config(tomllib.loads("[server.selector]\nname = 'oort'\nepsilon = 0.4\n[data]\nclients = 50"))
    b = load_config(tomllib.loads("[server]\nselector = {name = 'oort', epsilon = 0.4}\n[data]\nclients = 50"))
    assert a.to_dict() == b.to_dict() and a.server.options("selector").epsilon == 0.4


@pytest.mark.parametrize("old, value, field, new", [
    ("oort_epsilon", 0.3, {"selector": "oort"}, ("selector", "epsilon")),
    ("oort_alpha", 1.5, {"selector": "oort"}, ("selector", "alpha")),
    ("weighting_floor", 0.2, {"weighting": "loss_improvement"}, ("weighting", "floor")),
    ("weighting_mode", "cosine", {"weighting": "distance"}, ("weighting", "mode")),
    ("weighting_temperature", 2.0, {"weighting": "distance"}, ("weighting", "temperature")),
    ("weighting_target", "global", {"weighting": "label_importance"}, ("weighting", "target")),
    ("weighting_method", "nnls", {"weighting": "label_importance"}, ("weighting", "method")),
    ("server_momentum", 0.5, {"optimizer": "momentum"}, ("optimizer", "momentum")),
    ("server_beta1", 0.5, {"optimizer": "yogi"}, ("optimizer", "beta1")),
    ("server_beta2", 0.9, {"optimizer": "adam"}, ("optimizer", "beta2")),
    ("server_tau", 0.01, {"optimizer": "adagrad"}, ("optimizer", "tau")),
])
def test_old_flat_keys_are_read_with_a_note_naming_the_new_key(old, value, field, new):
    with pytest.warns(OldKeyNote, match=rf"server.{old} is an old key, read as server.{new[0]}.{new[1]}"):
        cfg = load_config(small(**field, **{old: value}))
    assert getattr(cfg.server.options(new[0]), new[1]) == value
    assert old not in cfg.to_dict()["server"]
    assert load_config(small(**{new[0]: {"name": field[new[0]], new[1]: value}})).to_dict() == cfg.to_dict()


def test_old_keys_at_their_default_are_quiet_and_others_refused_when_their_part_is_not_chosen():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # what an older version wrote out: every key, at its default
        cfg = load_config(small(oort_epsilon=0.2, oort_alpha=2.0, weighting_floor=0.1, weighting_mode="exp", server_momentum=0.9,
                                server_beta1=0.9, server_beta2=0.99, server_tau=1e-3, weighting_method="multiplicative"))
    assert cfg.to_dict() == load_config(small()).to_dict()
    with pytest.raises(ConfigError, match=r"server.oort_epsilon = 0.5: read only by server.selector = 'oort', not by server.selector = 'random'"):
        load_config(small(selector="random", oort_epsilon=0.5))
    with pytest.raises(ConfigError, match=r"server.server_beta2 = 0.5: read only by server.optimizer = 'adam' / 'yogi'"):
        load_config(small(optimizer="adagrad", server_beta2=0.5))
    with pytest.raises(ConfigError, match=r"server.oort_alpha and server.selector.alpha both given"):
        load_config(small(selector={"name": "oort", "alpha": 1.0}, oort_alpha=1.0))
    with pytest.raises(ConfigError, match=r"server.selector.epsilon \(read from the old key server.oort_epsilon\) = 3"):
        with pytest.warns(OldKeyNote):
            load_config(small(selector="oort", oort_epsilon=3))


def test_privacy_settings_are_the_config_section():
    assert PrivacySettings is PrivacyConfig
    with pytest.raises(ConfigError, match="privacy.adaptive_clipping = True: adaptive clipping needs privacy.mode = 'central'"):
        load_config({"privacy": {"mode": "local", "adaptive_clipping": True}})
    with pytest.raises(ConfigError, match="privacy.secagg_neighbors = 3: must be an even integer"):
        load_config({"privacy": {"secure_aggregation": True, "secagg_neighbors": 3}})


@pytest.mark.parametrize("cfg, match", [
    (small(aggregator="median", **{}) | {"compression": {"uplink": "sketch:0.01"}},
     r"compression.uplink = 'sketch:0.01': it aggregates in sketch space.*\[capability 'linear' missing from aggregator 'median'\]"),
    (small(aggregator="median") | {"engine": {"regions": 2}},
     r"engine.regions = 2: server.aggregator = 'median' does not decompose into regional sums.*capability 'linear' missing"),
])
def test_build_time_refusals_name_the_missing_capability(cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_coordinator(load_config(cfg), store=False)


@pytest.fixture()
def bare_transport():
    """A user's own backend that declares no capability, registered for one test only
    (left registered, it would show up in later tests' "allowed:" lists)."""
    from fleetlearn.parts import register_part, unregister_part

    register_part("transport", "test_bare", lambda *a: None)
    yield "test_bare"
    unregister_part("transport", "test_bare")


def test_a_backend_refuses_the_features_it_does_not_carry_by_capability(bare_transport):
    # Both built-in backends run the one client device and carry everything; a backend that
    # declares nothing (a user's own) gets each client-side feature refused by name.
    with pytest.raises(ConfigError, match=r"server.weighting = 'label_importance': engine.backend = 'test_bare' does not carry it.*"
                                          r"\[capability 'client_helpers' missing from transport 'test_bare'\]"):
        build_coordinator(load_config(small(weighting="label_importance") | {"engine": {"backend": "test_bare"}}), store=False)


def test_config_time_refusals_name_the_missing_capability(bare_transport):
    with pytest.raises(ConfigError, match=r"server.reputation = true needs the flags of server.aggregator = 'dnc'.*capability 'flags_clients'"):
        load_config(small(aggregator="median", reputation=True))
    with pytest.raises(ConfigError, match=r"server.aggregator = 'mifa'.*cannot run with server.mode = 'async' \[capability 'sync_only'"):
        load_config(small(aggregator="mifa", mode="async"))
    with pytest.raises(ConfigError, match=r"personalization.method = 'ditto'.*engine.backend = 'test_bare'.*capability 'personalization' missing"):
        load_config(SMALL | {"personalization": {"method": "ditto"}, "engine": {"backend": "test_bare"}})
    assert load_config(SMALL | {"personalization": {"method": "ditto"}, "engine": {"backend": "ray"}}).engine.backend == "ray"
    with pytest.raises(ConfigError, match=r"data.partition = 'natural'.*capability 'natural_devices' missing from dataset 'digits'"):
        load_config(SMALL | {"data": {"clients": 12, "partition": "natural"}})
