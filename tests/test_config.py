import json
import subprocess
import sys
from dataclasses import fields, replace

import pytest

from edge_qmul import config
from edge_qmul.config import (
    METHODS,
    Auto,
    Famr,
    Finetune,
    GradAscent,
    L1Sparse,
    QMul,
    RandomLabel,
    Retrain,
    Salun,
    Scrub,
)
from edge_qmul.errors import EXIT_CODES, ConfigError, EdgeQmulError, UnlearningError


def test_toml_sections_build_typed_configs(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[data]\ndataset = "fashion-mnist"\n[train]\nepochs = 3\nlr = 1\n[unlearn]\nlr = 0.02\n')
    toml = config.load_toml(path)
    assert config.resolve("data", toml, {}).dataset == "fashion-mnist"
    train = config.resolve("train", toml, {"epochs": 5, "lr": None})
    assert train.epochs == 5 and train.lr == 1.0  # flags win; None means "flag not given"
    assert config.resolve("unlearn", toml, {"method": "qmul"}) == QMul(lr=0.02)
    assert config.resolve("unlearn", toml, {"method": "famr"}) == Famr(lr=0.02)  # --method picks the class
    with pytest.raises(ConfigError, match="no method"):
        config.resolve("unlearn", toml, {})


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


# ---------------------------------------------------------------------------------------------------
# One config class per method; serialisation; one loader for every config
# ---------------------------------------------------------------------------------------------------

EVERY_CONFIG = [
    config.DataConfig(), config.DataConfig(dataset="npz", root="/x.npz", seed=3, train_fraction=0.5),
    config.TrainConfig(), config.TrainConfig(model="mobilenetv2", epochs=3, lr=1, generations=2),
    config.QuantConfig(), config.QuantConfig(backend="qnnpack", calibration_size=7),
    QMul(), QMul.paper_code(), QMul.paper_code(forget_loss_cap=2.0, label_variant="paper_code", reweight=False),
    Auto(), Auto(epochs=2, retain_ratio=3.0), Finetune(), Finetune(layers="classifier", repair_batches=2),
    RandomLabel(), GradAscent(lr=0.5), Famr(), Famr(famr_lambda=0.0), Retrain(),
    Salun(), Salun(layers="classifier", mask_ratio=0.3), Scrub(), Scrub(max_epochs=1, temperature=2.0), L1Sparse(),
    QMul(layers="last-2-blocks", norm_pooling="l2"), Auto(escalate="classifier,all"), Auto(escalate=""),
]


@pytest.mark.parametrize("cfg", EVERY_CONFIG, ids=lambda c: type(c).__name__)
def test_every_config_round_trips_through_json(cfg: config.Config) -> None:
    d = json.loads(json.dumps(cfg.to_dict()))
    back = config.config_from_dict(d)
    assert type(back) is type(cfg) and back == cfg and back.to_dict() == cfg.to_dict()


def test_every_config_class_is_covered_by_the_round_trip() -> None:
    assert {type(c) for c in EVERY_CONFIG} == {*config.STAGES.values(), *METHODS.values()}
    assert {type(c).section for c in EVERY_CONFIG} == set(config.SECTIONS)


def test_method_configs_carry_their_name_and_recommended_defaults() -> None:
    assert {n: c.name for n, c in METHODS.items()} == {n: n for n in METHODS}
    assert set(METHODS) == {"qmul", "auto", "finetune", "random_label", "grad_ascent", "famr", "salun", "scrub",
                            "l1_sparse", "retrain"}
    assert QMul().to_dict()["method"] == "qmul" and Retrain().to_dict() == {"method": "retrain", "version": 1}
    recommended = dict(layers="classifier", norm_batches=16, update="mixed", lr=0.3, epochs=5)
    for cls in (QMul, Auto):
        assert {k: getattr(cls(), k) for k in recommended} == recommended
    paper = dict(layers="all", update="sequential", lr=0.01, epochs=10, batch_size=256, norm_batches=0)
    assert {k: getattr(QMul.paper_code(), k) for k in paper} == paper
    assert type(Auto.paper_code()) is Auto
    assert (Finetune().epochs, Finetune().lr) == (2, 0.01)
    assert (RandomLabel().epochs, RandomLabel().lr) == (2, 0.01)
    assert (GradAscent().epochs, GradAscent().lr) == (1, 0.001)
    assert (Famr().epochs, Famr().lr, Famr().famr_lambda) == (1, 5e-5, 1.0)
    assert fields(Retrain) == ()  # retrain reuses the training recipe: no options of its own
    assert config.method_config("qmul", {"epochs": 2}) == replace(QMul(), epochs=2)


@pytest.mark.parametrize(
    "d",
    [
        {"method": "qmul", "version": 1, "learning_rate": 0.1},
        {"config": "train", "version": 1, "epoch": 3},
    ],
)
def test_unknown_key_in_a_dict_is_refused_with_the_valid_list(d: dict) -> None:
    with pytest.raises(ConfigError) as err:
        config.config_from_dict(d)
    assert "unknown option" in str(err.value) and "valid options are" in str(err.value)
    assert ("repair_batches" if "method" in d else "generations") in str(err.value)


@pytest.mark.parametrize(
    ("d", "needle"),
    [
        ({"method": "qmul"}, "version"),  # no version
        ({"method": "qmul", "version": 2}, "version"),
        ({"version": 1, "epochs": 3}, "exactly one"),
        ({"method": "qmul", "config": "train", "version": 1}, "exactly one"),
        ({"config": "os.system", "version": 1}, "unknown config"),  # only the allow-list is rebuilt
        (["qmul"], "table"),
    ],
)
def test_config_from_dict_takes_only_registered_classes(d: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        config.config_from_dict(d)  # type: ignore[arg-type]


def test_a_registry_miss_lists_the_registered_names() -> None:
    for call in (lambda: config.method_config("magic"), lambda: config.config_from_dict({"method": "magic",
                                                                                        "version": 1})):
        with pytest.raises(UnlearningError) as err:  # exit code 6, as before
            call()
        assert err.value.exit_code == 6 and all(name in str(err.value) for name in METHODS)


def test_unlearn_table_is_checked_against_the_method_class(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[unlearn]\nmethod = "famr"\nfamr_lambda = 2.0\nepochs = 3\n')
    toml = config.load_toml(path)
    assert config.resolve("unlearn", toml, {}) == Famr(famr_lambda=2.0, epochs=3)
    path.write_text('[unlearn]\nmethod = "qmul"\nfamr_lambda = 2.0\n')  # a famr option under qmul
    with pytest.raises(ConfigError) as err:
        config.load_toml(path)
    assert "famr_lambda" in str(err.value) and "norm_batches" in str(err.value)
    path.write_text('[unlearn]\nmethod = "magic"\n')
    with pytest.raises(UnlearningError, match="choose one of"):
        config.load_toml(path)
    path.write_text("[unlearn]\nfamr_lambda = 2.0\nupdate = 'mixed'\n")  # no single method takes both
    with pytest.raises(ConfigError, match="different methods"):
        config.load_toml(path)


def test_retrain_refuses_loop_options(tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        config.method_config("retrain", {"epochs": 3})
    assert "epochs" in str(err.value) and "retrain" in str(err.value) and "[train]" in str(err.value)
    path = tmp_path / "run.toml"
    path.write_text('[unlearn]\nmethod = "retrain"\nepochs = 3\n')
    with pytest.raises(ConfigError, match="epochs"):
        config.load_toml(path)
    assert config.method_config("retrain") == Retrain()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("lr = true", "lr"),
        ("epochs = 1.5", "epochs"),
        ("epochs = 99999999999999999999", "epochs"),
        ("lr = nan", "lr"),
        ("lr = inf", "lr"),
        ("lr = -0.1", "lr"),
        ("epochs = true", "epochs"),
        ("reweight = 1", "reweight"),
        ("layers = 3", "layers"),
        ("batch_size = 0", "batch_size"),
        ("seed = -1", "seed"),
        ("momentum = 1.5", "momentum"),
        ("repair_lr = inf", "repair_lr"),
    ],
)
@pytest.mark.parametrize("method", ["", 'method = "qmul"\n'])
def test_wrong_types_and_values_are_refused_in_toml(tmp_path, text: str, needle: str, method: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"[unlearn]\n{method}{text}\n")
    with pytest.raises(ConfigError) as err:
        config.load_toml(path)
    assert needle in str(err.value) and str(path) in str(err.value) and err.value.fix


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (QMul, dict(lr=True)), (QMul, dict(epochs=1.5)), (QMul, dict(epochs=99999999999999999999)),
        (QMul, dict(lr=float("nan"))), (QMul, dict(lr=float("inf"))), (QMul, dict(lr=10**400)),
        (Famr, dict(famr_lambda=float("nan"))), (Finetune, dict(epochs=False)), (GradAscent, dict(seed=2**64)),
        (config.TrainConfig, dict(epochs=True)), (config.TrainConfig, dict(lr=float("nan"))),
        (config.DataConfig, dict(seed="0")), (config.DataConfig, dict(val_fraction=float("nan"))),
        (config.DataConfig, dict(image_size=2)), (config.DataConfig, dict(color="sepia")),
        (config.QuantConfig, dict(calibration_size=1.0)),
    ],
)
def test_wrong_types_and_values_are_refused_in_code(cls: type, kwargs: dict) -> None:
    with pytest.raises(ConfigError) as err:
        cls(**kwargs)
    assert next(iter(kwargs)) in str(err.value) and err.value.fix


def test_an_int_for_a_float_field_is_stored_as_a_float() -> None:
    cfg = QMul(lr=1)
    assert isinstance(cfg.lr, float) and cfg == QMul(lr=1.0)


def test_stage_names_match_the_modules_that_use_them() -> None:
    from edge_qmul import data, quant

    assert data.DATASETS is config.DATASETS
    assert tuple(quant.BACKENDS) == config.BACKEND_NAMES


def test_config_is_the_bottom_of_the_core() -> None:
    """Importing the configs (and the train module's re-export of TrainConfig works) loads no torch."""
    code = ("import sys, edge_qmul.config\n"
            "assert 'torch' not in sys.modules, 'torch'\n"
            "assert not [m for m in sys.modules if m.startswith('edge_qmul.') and m not in "
            "('edge_qmul.config', 'edge_qmul.errors')], sorted(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    from edge_qmul.train import TrainConfig

    assert TrainConfig is config.TrainConfig
