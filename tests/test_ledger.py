import sqlite3

import pytest

from edge_qmul.errors import LedgerError
from edge_qmul.ledger import Ledger


def test_requests_are_idempotent_by_id(tmp_path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.add("r1", "samples", {"ids": 3}, [5, 3, 3, 9]) is True
        assert ledger.add("r1", "samples", {"ids": 3}, [3, 5, 9]) is False
        assert ledger.add("r2", "class", {"class": 1}, [9, 11]) is True
        assert [r.request_id for r in ledger.requests()] == ["r1", "r2"]
        assert ledger.forget_ids() == [3, 5, 9, 11]


def test_same_id_with_other_samples_is_refused(tmp_path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        ledger.add("r1", "samples", {}, [1])
        with pytest.raises(LedgerError, match="different samples"):
            ledger.add("r1", "samples", {}, [2])
        assert ledger.forget_ids() == [1]



def test_a_batch_commits_once_and_a_refused_request_inside_it_leaves_the_others(tmp_path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.add("r1", "samples", {}, [1])
        with ledger.batch():
            assert ledger.add("r2", "samples", {}, [2]) is True
            with pytest.raises(LedgerError, match="different samples"):
                ledger.add("r1", "samples", {}, [3])  # refused: rolled back alone
            assert ledger.add("r2", "samples", {}, [2]) is False  # the batch sees its own rows
            assert ledger.add("r4", "samples", {}, [4]) is True
            reader = sqlite3.connect(path)  # nothing of the batch is visible (or durable) before it ends
            assert reader.execute("SELECT request_id FROM requests").fetchall() == [("r1",)]
            reader.close()
        with Ledger(path) as other:
            assert [r.request_id for r in other.requests()] == ["r1", "r2", "r4"]
            assert other.forget_ids() == [1, 2, 4]


def test_an_error_out_of_a_batch_rolls_the_whole_batch_back(tmp_path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        with pytest.raises(OSError), ledger.batch():
            ledger.add("r1", "samples", {}, [1])
            raise OSError("disk gone")
        assert ledger.requests() == []
        ledger.add("r2", "samples", {}, [2])  # the connection is usable afterwards
        assert [r.request_id for r in ledger.requests()] == ["r2"]

def test_requests_survive_reopening_and_use_wal(tmp_path) -> None:
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.add("r1", "fraction", {"fraction": 0.1}, [4, 2])
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    with Ledger(path) as ledger:
        (req,) = ledger.requests()
        assert req.sample_ids == [2, 4] and req.honoured_by is None and req.spec == {"fraction": 0.1}
        ledger.mark_honoured(["r1"], "qmul-abc")
        ledger.mark_honoured(["r1"], "qmul-later")  # the first model to honour it stays recorded
        assert ledger.requests()[0].honoured_by == "qmul-abc"


def test_unknown_kind_and_corrupt_file(tmp_path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger, pytest.raises(LedgerError, match="kind"):
        ledger.add("r1", "everything", {}, [1])
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(LedgerError, match="bad.sqlite"):
        Ledger(bad)
