import pytest

from fleetlearn.config import ConfigError, RunConfig, load_config


def test_default_is_the_embedded_job():
    cfg = load_config(None)
    assert cfg.data.dataset == "digits" and cfg.data.num_clients == 100
    assert cfg.data.partition == "dirichlet" and cfg.data.alpha == 0.5
    assert cfg.server.rounds == 20 and cfg.model.name == "mlp"


def test_overrides_are_typed_from_toml():
    cfg = load_config(None, ["server.rounds=5", "client.lr=0.1", "devices.profile=mixed_fleet", "model.hidden=[32, 16]"])
    assert cfg.server.rounds == 5 and cfg.client.lr == 0.1
    assert cfg.devices.profile == "mixed_fleet" and cfg.model.hidden == [32, 16]


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"server": {"cohort": -1}}, "server.cohort = -1"),
        ({"server": {"cohort": 500}}, "exceeds the number of clients"),
        ({"data": {"dataset": "imagenet"}}, "unknown dataset 'imagenet'"),
        ({"data": {"partition": "bogus"}}, "data.partition = 'bogus'"),
        ({"server": {"bogus_key": 1}}, "server.bogus_key: unknown key (allowed: rounds"),
        ({"nonsense": {}}, "nonsense: unknown key"),
        ({"client": {"lr": "fast"}}, "client.lr = 'fast'"),
        ({"data": {"partition": "natural"}}, "natural"),
    ],
)
def test_errors_name_the_key_and_value(data, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(data)
    assert needle in str(exc.value)


def test_unknown_dataset_error_lists_what_is_allowed():
    with pytest.raises(ConfigError, match="allowed: digits, synthetic, fashion_mnist"):
        load_config({"data": {"dataset": "cifar"}})


def test_malformed_toml_names_the_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[server\nrounds = 3")
    with pytest.raises(ConfigError, match="bad.toml: malformed TOML"):
        load_config(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_toml_round_trip(tmp_path):
    cfg = load_config({"seed": 3, "server": {"rounds": 4, "cohort": 5}, "data": {"clients": 12}})
    p = tmp_path / "c.toml"
    p.write_text(cfg.to_toml())
    again = load_config(p)
    assert again == cfg and again.digest() == cfg.digest()


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["server.rounds"])


def test_typed_object_passes_through():
    cfg = RunConfig()
    assert load_config(cfg) is cfg
