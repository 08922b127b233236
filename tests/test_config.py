import pytest

from edge_qmul import config
from edge_qmul.errors import EXIT_CODES, ConfigError, EdgeQmulError
from edge_qmul.unlearn import UnlearnConfig


def test_toml_sections_build_typed_configs(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[data]\ndataset = "fashion-mnist"\n[train]\nepochs = 3\nlr = 1\n[unlearn]\nlr = 0.02\n')
    toml = config.load_toml(path)
    assert config.resolve("data", toml, {}).dataset == "fashion-mnist"
    train = config.resolve("train", toml, {"epochs": 5, "lr": None})
    assert train.epochs == 5 and train.lr == 1.0  # flags win; None means "flag not given"
    assert config.resolve("unlearn", toml, {}) == UnlearnConfig(lr=0.02)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[train]\nepochs = 3\nlearning_rate = 0.1\n", "learning_rate"),
        ("[training]\nepochs = 3\n", "[training]"),
        ("[train]\nepochs = 'three'\n", "epochs"),
        ("[train\n", "not valid TOML"),
        ("[data]\ndataset = 'imagenet'\n", "imagenet"),
    ],
)
def test_bad_toml_names_the_problem(tmp_path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        config.load_toml(path)
    assert needle in str(err.value)
    assert err.value.fix


def test_unknown_key_lists_valid_options(tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[unlearn]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError) as err:
        config.load_toml(path)
    assert "valid options are" in str(err.value) and "repair_batches" in str(err.value)


def test_missing_config_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config.load_toml(tmp_path / "missing.toml")


def test_every_error_class_has_a_documented_exit_code() -> None:
    classes = EdgeQmulError.__subclasses__()
    assert len(classes) >= 6
    for cls in classes:
        assert cls.exit_code in EXIT_CODES and EXIT_CODES[cls.exit_code].strip(), cls
    assert len({cls.exit_code for cls in classes}) == len(classes)


def test_config_hash_is_stable() -> None:
    a = config.config_hash(config.DataConfig(), config.QuantConfig())
    assert a == config.config_hash(config.DataConfig(), config.QuantConfig())
    assert a != config.config_hash(config.DataConfig(seed=1), config.QuantConfig())
