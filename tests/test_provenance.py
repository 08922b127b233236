"""Training provenance by content id (issue 15, item 3): which device contributed which training sample,
recorded at train / import time from a CSV, and devices' requests checked against it by hash."""

from __future__ import annotations

from pathlib import Path

import pytest

import edge_qmul as eq
from edge_qmul import data, provenance
from edge_qmul.cli import main
from edge_qmul.errors import ConfigError, DataError, ForgetRequestError
from edge_qmul.run import Run
from edge_qmul.store import SampleStore

DEVICES = ("board-a", "board-b", "board-c")


@pytest.fixture(scope="module")
def split_ids() -> dict[str, list[str]]:
    """The content ids of the digits run's train / val / test samples (the split DataConfig() makes)."""
    source = data.load_dataset("digits")
    split = data.make_split(source, 0, val_fraction=0.1, test_fraction=0.2)
    ids = data.content_ids(source.train)
    return {"train": [ids[i] for i in split.train], "val": [ids[i] for i in split.val],
            "test": [ids[i] for i in split.test]}


def _csv(path: Path, rows: list[tuple[str, str]], header: str = "device_id,sha256") -> Path:
    path.write_text("\n".join([header, *(f"{d},{h}" for d, h in rows)]) + "\n")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, split_ids: dict[str, list[str]]) -> Path:
    """A digits run (1 epoch) whose training samples came from three devices, round robin (unique ids only)."""
    tmp = tmp_path_factory.mktemp("prov")
    unique = list(dict.fromkeys(split_ids["train"]))
    rows = [(DEVICES[i % 3], h) for i, h in enumerate(unique)]
    path = _csv(tmp / "provenance.csv", rows)
    eq.Run(tmp / "run").train(eq.DataConfig(), eq.TrainConfig(epochs=1), provenance=path)
    return tmp / "run"


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_the_store_records_who_contributed_what(run: Path, split_ids: dict[str, list[str]]) -> None:
    with SampleStore(Run(run).require("samples")) as store:
        counts = store.devices()
        assert set(counts) == set(DEVICES) and sum(counts.values()) == len(set(split_ids["train"]))
        first = store.contributed_by("board-a")[0]
        assert store.owners([first]) == {first: {"board-a"}}


def test_a_device_forgets_its_own_samples_by_hash(run: Path, tmp_path: Path) -> None:
    r = eq.Run(_copy(run, tmp_path))
    with SampleStore(r.require("samples")) as store:
        mine = store.contributed_by("board-b")[:5]
    receipt = r.forget(hashes=mine, device="board-b", source="device")
    assert receipt.added and receipt.samples >= 5
    with r.ledger() as ledger:
        req = ledger.requests()[-1]
    assert req.kind == "samples" and req.spec["device"] == "board-b"


def test_a_hash_of_another_device_is_refused(run: Path, tmp_path: Path) -> None:
    r = eq.Run(_copy(run, tmp_path))
    with SampleStore(r.require("samples")) as store:
        theirs = store.contributed_by("board-c")[:1]
    with pytest.raises(ForgetRequestError, match="contributed by other devices"):
        r.forget(hashes=theirs, device="board-a")
    with r.ledger() as ledger:
        assert ledger.requests() == []  # nothing recorded


def test_a_hash_outside_the_training_set_is_refused(run: Path, tmp_path: Path,
                                                    split_ids: dict[str, list[str]]) -> None:
    r = eq.Run(_copy(run, tmp_path))
    outside = [h for h in split_ids["test"] if h not in set(split_ids["train"])][:1]
    for wanted in (outside, ["0" * 64]):
        with pytest.raises(ForgetRequestError, match="not in the training set"):
            r.forget(hashes=wanted, device="board-a")


def test_class_and_leave_select_only_the_devices_own_samples(run: Path, tmp_path: Path) -> None:
    r = eq.Run(_copy(run, tmp_path))
    with SampleStore(r.require("samples")) as store:
        own = set(store.ids_for_hashes(store.contributed_by("board-a")).keys())
    r.forget(klass=3, device="board-a")
    r.forget(leave=True, device="board-a", request_id="leave-a")
    with r.ledger() as ledger:
        by_id = {q.request_id: q for q in ledger.requests()}
    leave = by_id.pop("leave-a")
    (cls,) = by_id.values()
    with SampleStore(r.require("samples")) as store:
        hashes = store.hashes(leave.sample_ids)
    assert set(hashes.values()) <= own and leave.kind == "client" and leave.spec["device"] == "board-a"
    assert set(cls.sample_ids) < set(leave.sample_ids) and cls.spec["class"] == 3
    with pytest.raises(ForgetRequestError, match="contributed no training sample"):
        r.forget(leave=True, device="board-z")


def test_device_requests_take_hashes_class_or_leave_only(run: Path, tmp_path: Path) -> None:
    r = eq.Run(_copy(run, tmp_path))
    with pytest.raises(ConfigError, match="hashes"):
        r.forget(ids=[1, 2], device="board-a")
    with pytest.raises(ConfigError, match="leave"):
        r.forget(leave=True)


def test_a_run_without_provenance_has_no_device_requests(tmp_path: Path) -> None:
    r = eq.Run(tmp_path / "run")
    r.train(eq.DataConfig(), eq.TrainConfig(epochs=1))
    with pytest.raises(ForgetRequestError, match="--provenance"):
        r.forget(leave=True, device="board-a")


def test_provenance_naming_a_validation_sample_is_refused_before_anything_is_written(
        tmp_path: Path, split_ids: dict[str, list[str]]) -> None:
    val_only = [h for h in split_ids["val"] if h not in set(split_ids["train"])][:2]
    path = _csv(tmp_path / "p.csv", [("board-a", split_ids["train"][0]), ("board-b", val_only[0])])
    with pytest.raises(DataError, match="not in the training set"):
        eq.Run(tmp_path / "run").train(eq.DataConfig(), eq.TrainConfig(epochs=1), provenance=path)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "header"),
        ("device,hash\nboard-a," + "a" * 64, "header"),
        ("device_id,sha256\nboard-a", "2 fields"),
        ("device_id,sha256\nboard a," + "a" * 64, "device id"),
        ("device_id,sha256\nboard-a,xyz", "not a sha256"),
        ("device_id,sha256\n", "no samples"),
    ],
)
def test_malformed_provenance_files_name_the_line(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as err:
        provenance.read_csv(path)
    assert str(path) in str(err.value)


def test_csv_reading_lowers_hashes_and_drops_duplicates(tmp_path: Path) -> None:
    h = "AB" * 32
    path = _csv(tmp_path / "p.csv", [("d1", h), ("d1", h.lower()), ("d2", h)])
    assert provenance.read_csv(path) == [("d1", h.lower()), ("d2", h.lower())]


def test_cli_import_with_provenance_and_a_device_request(run: Path, tmp_path: Path,
                                                         split_ids: dict[str, list[str]],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = _csv(tmp_path / "p.csv", [("board-a", h) for h in list(dict.fromkeys(split_ids["train"]))[:50]])

    import torch

    from edge_qmul.train import load_checkpoint

    model, *_ = load_checkpoint(run / "float.pt")  # weights_only=True inside
    torch.save(model.state_dict(), tmp_path / "w.pt")
    rundir = tmp_path / "cli-run"
    assert main(["import", "--run", str(rundir), "--model", "small_cnn", "--weights", str(tmp_path / "w.pt"),
                 "--provenance", str(path), "--quiet"]) == 0
    hashes = tmp_path / "h.txt"
    hashes.write_text(split_ids["train"][0] + "\n")
    assert main(["forget", "--run", str(rundir), "--device", "board-a", "--hashes", str(hashes)]) == 0
    assert main(["forget", "--run", str(rundir), "--device", "board-b", "--hashes", str(hashes)]) == 5
    assert "contributed by other devices" in capsys.readouterr().err
