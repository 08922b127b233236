"""A device's own state (edge_qmul.devices.state, DESIGN.md §8): its key, pinned fleet key, sample index by content
id, the durable signed request queue, model bookkeeping, and the `edge-qmul device` verbs on a lean install."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from edge_qmul.devices import ed25519
from edge_qmul.devices.state import (
    KEY_FILE,
    PROTOCOL,
    STATE_DB,
    DataSpec,
    DeviceState,
    canonical_json,
    render_status,
    verify_request,
)
from imagedata import digits_uint8, write_image_folder

from edge_qmul import content, data
from edge_qmul.cli import main
from edge_qmul.errors import ConfigError, DataError, EdgeQmulError, ForgetRequestError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = [f"c{i}" for i in range(10)]


def fleet_key() -> str:
    return Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], np.ndarray]:
    """An image folder of 60 PNG digits (one pool), its files in image order, and their labels."""
    images, labels = digits_uint8(60)
    root = tmp_path_factory.mktemp("photos") / "data"
    paths = write_image_folder(root, images, labels, CLASSES)
    return root, paths, labels


@pytest.fixture(scope="module")
def npz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images, labels = digits_uint8(80)
    path = tmp_path_factory.mktemp("arrays") / "mine.npz"
    np.savez(path, x_train=images[:60, 0], y_train=labels[:60], x_test=images[60:].transpose(0, 2, 3, 1),
             y_test=labels[60:])
    return path


@pytest.fixture
def device(tmp_path: Path, folder: tuple[Path, list[Path], np.ndarray]) -> Iterator[DeviceState]:
    d = DeviceState.init(tmp_path / "state", DataSpec("imagefolder", folder[0]), fleet_key())
    yield d
    d.close()


def indexed(d: DeviceState) -> dict[str, tuple[int, str]]:
    return {h: (label, src) for h, label, src in d._conn.execute("SELECT sha256, label, source FROM samples")}


def bodies(d: DeviceState) -> list[dict[str, object]]:
    return [verify_request(entry) for entry in d.pending()]


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---- init: ids are the server's content ids -------------------------------------------------------


def test_image_folder_ids_and_labels_are_the_servers(device: DeviceState, folder: tuple[Path, list[Path], np.ndarray]
                                                     ) -> None:
    root, paths, labels = folder
    server = data.load_dataset("imagefolder", root)
    got = indexed(device)
    assert set(got) == set(data.content_ids(server.train))
    for sha, label in zip(data.content_ids(server.train), server.train.labels, strict=True):
        assert got[sha][0] == int(label)
    for path, label in zip(paths, labels, strict=True):  # the file's bytes, nothing decoded
        assert got[hashlib.sha256(path.read_bytes()).hexdigest()] == (int(label), path.relative_to(root).as_posix())
    assert device.classes == server.classes == tuple(CLASSES)
    assert len(device.device_id) == 64 and ed25519.is_public_key(bytes.fromhex(device.device_id))


def test_train_test_folder_indexes_both_pools(tmp_path: Path) -> None:
    images, labels = digits_uint8(80)  # the first 30 hold every class three times, the other 50 every class too
    write_image_folder(tmp_path / "d", images[:30], labels[:30], CLASSES, split="train")
    write_image_folder(tmp_path / "d", images[30:], labels[30:], CLASSES, split="test")
    server = data.load_dataset("imagefolder", tmp_path / "d")
    assert server.test is not None
    with DeviceState.init(tmp_path / "s", DataSpec("imagefolder", tmp_path / "d"), fleet_key()) as d:
        got = indexed(d)
        assert set(got) == set(data.content_ids(server.train)) | set(data.content_ids(server.test))
        assert {src.split("/")[0] for _, src in got.values()} == {"train", "test"}


def test_npz_ids_are_the_servers_pixel_hashes(tmp_path: Path, npz_file: Path) -> None:
    server = data.load_dataset("npz", npz_file)
    assert server.test is not None
    with DeviceState.init(tmp_path / "s", DataSpec("npz", npz_file), fleet_key()) as d:
        got = indexed(d)
        want = data.content_ids(server.train) + data.content_ids(server.test)
        assert set(got) == set(want)
        assert got[want[0]] == (int(server.train.labels[0]), "x_train[0]")
        assert got[want[-1]] == (int(server.test.labels[-1]), f"x_test[{len(server.test) - 1}]")
        assert d.status().dataset == "npz" and d.sample_count() == len(set(want))


def test_one_definition_of_content_ids() -> None:
    assert data.hash_file is content.hash_file and data.hash_pixels is content.hash_pixels


def test_the_state_holds_only_device_things(device: DeviceState) -> None:
    key_file = device.dir / KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert device.dir.stat().st_mode & 0o077 == 0  # the key's directory is the owner's alone
    assert sorted(p.name for p in device.dir.iterdir() if not p.name.startswith(STATE_DB)) == [KEY_FILE]
    meta = dict(device._conn.execute("SELECT key, value FROM meta"))
    assert set(meta) == {"schema_version", "device_id", "fleet_key", "dataset", "data_root", "classes", "created"}


# ---- refusals at init ------------------------------------------------------------------------------


def off_curve_key() -> str:
    """32 bytes of hex that decode to no curve point: a typo'd key of the right length."""
    for i in range(1000):
        raw = hashlib.sha256(bytes([i])).digest()
        if not ed25519.is_public_key(raw):
            return raw.hex()
    raise AssertionError("no off-curve candidate")


@pytest.mark.parametrize("key", ["", "00", "zz" * 32, "ab" * 33, "not a key at all", "OFF_CURVE"])
def test_malformed_fleet_key_is_refused_and_nothing_is_written(tmp_path: Path, folder: tuple[Path, list[Path],
                                                                                             np.ndarray], key: str
                                                               ) -> None:
    key = off_curve_key() if key == "OFF_CURVE" else key
    with pytest.raises(ConfigError) as info:
        DeviceState.init(tmp_path / "state", DataSpec("imagefolder", folder[0]), key)
    assert "fleet key" in info.value.message and (key[:20] in info.value.message) and info.value.fix
    assert list(tmp_path.iterdir()) == []


def test_fleet_key_given_as_a_path_says_to_pass_its_contents(tmp_path: Path, folder: tuple[Path, list[Path],
                                                                                            np.ndarray]) -> None:
    key_file = tmp_path / "public_key.hex"
    key_file.write_text(fleet_key())
    with pytest.raises(ConfigError) as info:
        DeviceState.init(tmp_path / "state", DataSpec("imagefolder", folder[0]), str(key_file))
    assert f"$(cat {key_file})" in str(info.value.fix)


def test_reinit_is_refused_and_changes_nothing(device: DeviceState, folder: tuple[Path, list[Path], np.ndarray]
                                               ) -> None:
    device.forget(label=1)
    before = snapshot(device.dir)
    with pytest.raises(ConfigError, match="already holds a device state"):
        DeviceState.init(device.dir, DataSpec("imagefolder", folder[0]), fleet_key())
    assert snapshot(device.dir) == before
    assert len(device.pending()) == 1


def test_init_refuses_a_non_empty_directory_and_bad_data(tmp_path: Path, folder: tuple[Path, list[Path], np.ndarray]
                                                         ) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        DeviceState.init(busy, DataSpec("imagefolder", folder[0]), fleet_key())
    with pytest.raises(DataError, match="does not exist"):
        DeviceState.init(tmp_path / "s", DataSpec("imagefolder", tmp_path / "nowhere"), fleet_key())
    with pytest.raises(ConfigError, match="image folder or an .npz"):
        DataSpec("cifar10", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no temporary directory left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    with DeviceState.init(empty, DataSpec("imagefolder", folder[0]), fleet_key()) as d:  # an empty dir is fine
        assert d.sample_count() == 60


def test_init_where_nothing_can_be_written_is_a_clear_error(tmp_path: Path, folder: tuple[Path, list[Path],
                                                                                            np.ndarray]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot create the state directory"):
        DeviceState.init(blocker / "state", DataSpec("imagefolder", folder[0]), fleet_key())
    assert blocker.read_text() == "not a directory"


def test_open_without_state_says_how_to_set_one_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        DeviceState.open(tmp_path)
    assert "edge-qmul device init" in str(info.value.fix)


# ---- filing requests -------------------------------------------------------------------------------


def test_forget_by_files_hashes_class_and_all(device: DeviceState, folder: tuple[Path, list[Path], np.ndarray]
                                              ) -> None:
    _, paths, labels = folder
    file_hashes = sorted(content.hash_file(p) for p in paths[:3])
    a = device.forget(files=[paths[2], paths[0], paths[1]])
    b = device.forget(hashes=[h.upper() for h in file_hashes[:2]] + [file_hashes[0]])  # case and repeats fold
    c = device.forget(label=4)
    e = device.forget(leave=True)
    assert (a.kind, a.samples, b.kind, b.samples, c.kind, c.klass, e.kind, e.samples) == (
        "samples", 3, "samples", 2, "class", 4, "leave", 0)
    got = bodies(device)
    assert [g["request_id"] for g in got] == [a.request_id, b.request_id, c.request_id, e.request_id]
    assert got[0]["hashes"] == file_hashes and got[1]["hashes"] == file_hashes[:2]
    fours = sorted(content.hash_file(p) for p, y in zip(paths, labels, strict=True) if y == 4)
    assert got[2]["hashes"] == fours and got[2]["class"] == 4 and c.samples == len(fours)
    assert got[3]["hashes"] == [] and got[3]["class"] is None
    for body in got:
        assert body["device_id"] == device.device_id and body["protocol"] == PROTOCOL
        assert len(str(body["request_id"])) == 32 and int(str(body["request_id"]), 16) >= 0
        assert sorted(body) == ["class", "created", "device_id", "hashes", "kind", "protocol", "request_id"]
    assert len({g["request_id"] for g in got}) == 4


def test_signature_verifies_with_the_device_key_and_not_after_tampering(device: DeviceState) -> None:
    device.forget(label=2)
    entry = device.pending()[0]
    payload, signature = entry["payload"].encode("ascii"), bytes.fromhex(entry["signature"])
    body = json.loads(payload)
    assert canonical_json(body) == payload
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(device.device_id)).verify(signature, payload)  # raises if bad
    assert ed25519.verify(bytes.fromhex(device.device_id), payload, signature)
    forged = canonical_json({**body, "class": 3}).decode("ascii")
    with pytest.raises(ForgetRequestError, match="does not verify"):
        verify_request({**entry, "payload": forged})
    other = Ed25519PrivateKey.generate()
    impostor = canonical_json({**body, "device_id": other.public_key().public_bytes(Encoding.Raw,
                                                                                     PublicFormat.Raw).hex()})
    with pytest.raises(ForgetRequestError, match="does not verify"):
        verify_request({**entry, "payload": impostor.decode("ascii")})
    with pytest.raises(ForgetRequestError, match="canonical"):
        verify_request({**entry, "payload": json.dumps(body)})


@pytest.mark.parametrize("case", ["unknown-file", "missing-file", "hash-not-held", "malformed-hash", "class-not-held",
                                  "negative-class", "two-selections", "no-selection", "empty-files"])
def test_refused_requests_name_the_item_and_queue_nothing(device: DeviceState, tmp_path: Path, case: str) -> None:
    stranger = tmp_path / "stranger.png"
    stranger.write_bytes(b"\x89PNG not one of the device's")
    foreign = hashlib.sha256(b"someone else's photo").hexdigest()
    for label in range(10):  # find a class this device does not hold
        if not device._conn.execute("SELECT 1 FROM samples WHERE label = ?", (label,)).fetchone():
            break
    else:
        label = 10
    calls = {
        "unknown-file": (lambda: device.forget(files=[stranger]), str(stranger)),
        "missing-file": (lambda: device.forget(files=[tmp_path / "gone.png"]), "gone.png"),
        "hash-not-held": (lambda: device.forget(hashes=[foreign]), foreign),
        "malformed-hash": (lambda: device.forget(hashes=["abc123"]), "abc123"),
        "class-not-held": (lambda: device.forget(label=label), f"class {label}"),
        "negative-class": (lambda: device.forget(label=-1), "-1"),
        "two-selections": (lambda: device.forget(label=1, leave=True), "label + leave"),
        "no-selection": (lambda: device.forget(), "none"),
        "empty-files": (lambda: device.forget(files=[]), "no files"),
    }
    call, needle = calls[case]
    with pytest.raises(ForgetRequestError) as info:
        call()
    assert needle in info.value.message and info.value.fix
    assert device.pending() == [] and device.requests() == []


def test_refusal_names_the_first_unknown_hashes_only(device: DeviceState) -> None:
    held = next(iter(indexed(device)))
    foreign = [hashlib.sha256(bytes([i])).hexdigest() for i in range(8)]
    with pytest.raises(ForgetRequestError) as info:
        device.forget(hashes=[held, *foreign])
    assert "8 hash(es)" in info.value.message and foreign[0] in info.value.message
    assert foreign[-1] not in info.value.message and "and 3 more" in info.value.message
    assert held not in info.value.message


def test_files_are_refused_on_an_npz_device(tmp_path: Path, npz_file: Path) -> None:
    with DeviceState.init(tmp_path / "s", DataSpec("npz", npz_file), fleet_key()) as d, \
            pytest.raises(ForgetRequestError, match="arrays"):
        d.forget(files=[npz_file])


def test_a_second_leave_is_refused_unless_the_first_was(device: DeviceState) -> None:
    first = device.forget(leave=True)
    with pytest.raises(ForgetRequestError, match=first.request_id):
        device.forget(leave=True)
    device.mark(first.request_id, "refused", "not-registered")
    device.forget(leave=True)


# ---- durability ------------------------------------------------------------------------------------

KILL_AFTER_FORGET = """
import os, signal, sys
from edge_qmul.devices.state import DeviceState

d = DeviceState.open(sys.argv[1])
filed = d.forget(label=int(sys.argv[2]))
print(filed.request_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close, no atexit, no flush of anything else
"""


def test_a_request_survives_kill_9_right_after_forget_returns(device: DeviceState) -> None:
    label = int(next(iter(indexed(device).values()))[0])
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_FORGET, str(device.dir), str(label)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    request_id = proc.stdout.strip()
    with DeviceState.open(device.dir) as reopened:
        [entry] = reopened.pending()
        assert entry["request_id"] == request_id and verify_request(entry)["class"] == label
        assert reopened.requests()[0].status == "pending"


# ---- answers and models ----------------------------------------------------------------------------


def test_marks_follow_the_request_lifecycle(device: DeviceState) -> None:
    a, b, c = device.forget(label=1), device.forget(label=2), device.forget(label=3)
    device.mark(a.request_id, "sent")
    assert [e["request_id"] for e in device.pending()] == [a.request_id, b.request_id, c.request_id]  # unanswered
    device.mark(a.request_id, "acknowledged")
    device.mark(a.request_id, "acknowledged")  # a repeated answer is a no-op
    device.mark(b.request_id, "refused", reason="not-owner")
    assert [e["request_id"] for e in device.pending()] == [c.request_id]
    device.mark(a.request_id, "honoured", model_version="qmul-0a1b2c3d4e5f")
    with pytest.raises(ForgetRequestError, match="refused; it cannot become honoured"):
        device.mark(b.request_id, "honoured")
    with pytest.raises(ForgetRequestError, match="honoured; it cannot become sent"):
        device.mark(a.request_id, "sent")
    with pytest.raises(ForgetRequestError, match="no request"):
        device.mark("f" * 32, "sent")
    with pytest.raises(ConfigError, match="unknown request status"):
        device.mark(c.request_id, "lost")
    records = {r.request_id: r for r in device.requests()}
    assert records[a.request_id].status == "honoured" and records[a.request_id].model_version == "qmul-0a1b2c3d4e5f"
    assert (records[b.request_id].status, records[b.request_id].reason) == ("refused", "not-owner")
    assert records[c.request_id].status == "pending"


def test_models_record_active_and_parent(device: DeviceState) -> None:
    assert device.models() == [] and device.status().active_model == ""
    device.set_model("base-111111111111")
    device.set_model("qmul-222222222222", parent="base-111111111111")
    st = device.status()
    assert (st.active_model, st.parent_model) == ("qmul-222222222222", "base-111111111111")
    device.set_model("base-111111111111", parent="qmul-222222222222")  # a rollback
    assert [m.version for m in device.models()] == ["base-111111111111", "qmul-222222222222", "base-111111111111"]
    with pytest.raises(ConfigError, match="not a version name"):
        device.set_model("../../etc/passwd")


def test_status_shows_each_request_and_the_model(device: DeviceState) -> None:
    a, b = device.forget(label=1), device.forget(leave=True)
    device.mark(a.request_id, "refused", reason="not-in-training-set")
    device.set_model("qmul-222222222222", parent="base-111111111111")
    text = render_status(device.status())
    assert "1 pending, 0 sent, 0 acknowledged, 1 refused, 0 honoured" in text
    assert f"refused      {a.request_id}" in text and "reason: not-in-training-set" in text
    assert f"pending      {b.request_id}" in text and "leave the fleet" in text
    assert "qmul-222222222222 (parent base-111111111111)" in text and device.device_id in text
    as_json = device.status().to_dict()
    assert as_json["counts"]["refused"] == 1 and as_json["requests"][0]["class"] == 1


# ---- the CLI ---------------------------------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["device", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_init_forget_status(tmp_path: Path, folder: tuple[Path, list[Path], np.ndarray],
                                capsys: pytest.CaptureFixture[str]) -> None:
    root, paths, _ = folder
    state = str(tmp_path / "state")
    code, out, _ = cli(capsys, "init", "--state", state, "--dataset", "imagefolder", "--data-root", str(root),
                       "--fleet-key", fleet_key())
    assert code == 0 and "60 samples in 10 classes" in out
    hashes = tmp_path / "hashes.txt"
    hashes.write_text(f"# mine\n{content.hash_file(paths[5])}\n\n{content.hash_file(paths[6])}  IMG_6.png\n")
    for flags in (["--files", str(paths[0]), str(paths[1])], ["--hashes", str(hashes)], ["--class", "7"], ["--all"]):
        code, out, _ = cli(capsys, "forget", "--state", state, *flags)
        assert code == 0 and "queued" in out
    code, out, _ = cli(capsys, "status", "--state", state)
    assert code == 0 and "4 pending" in out and "class 7" in out and "leave the fleet" in out
    code, out, _ = cli(capsys, "status", "--state", state, "--json")
    status = json.loads(out)
    assert [r["kind"] for r in status["requests"]] == ["samples", "samples", "class", "leave"]
    assert [r["samples"] for r in status["requests"][:2]] == [2, 2] and status["counts"]["pending"] == 4


@pytest.mark.parametrize(("argv", "code", "needle"), [
    (["init", "--dataset", "npz", "--data-root", "x.npz", "--fleet-key", "00"], 2, "fleet key '00'"),
    (["init", "--dataset", "imagefolder", "--data-root", "NOWHERE", "--fleet-key", "KEY"], 3, "does not exist"),
    (["init", "--dataset", "cifar10", "--data-root", "x", "--fleet-key", "KEY"], 2, "invalid choice"),
    (["forget", "--hashes", "HASHES"], 5, "not among this device's samples"),
    (["forget", "--hashes", "NOWHERE"], 2, "cannot read hashes file"),
    (["forget", "--class", "99"], 5, "no sample of class 99"),
    (["forget", "--files", "NOWHERE"], 5, "not a file"),
    (["forget", "--files", "FOLDER"], 5, "not a file"),
    (["forget"], 2, "one of the arguments --files --hashes --class --all is required"),
    (["forget", "--class", "1", "--all"], 2, "not allowed with"),
])
def test_cli_refusals_exit_with_their_area_code(device: DeviceState, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                argv: list[str], code: int, needle: str) -> None:
    hashes = tmp_path / "foreign.txt"
    hashes.write_text(hashlib.sha256(b"x").hexdigest() + "\n")
    subs = {"KEY": fleet_key(), "HASHES": str(hashes), "NOWHERE": str(tmp_path / "nowhere"), "FOLDER": str(tmp_path)}
    argv = [subs.get(a, a) for a in argv]
    state = device.dir if argv[0] == "forget" else tmp_path / "new-state"
    before = snapshot(device.dir)
    got, _, err = cli(capsys, argv[0], "--state", str(state), *argv[1:])
    assert got == code and needle in err, err
    assert snapshot(device.dir) == before and not (tmp_path / "new-state").exists()
    assert "Traceback" not in err


LEAN = """
import json, sys
for name in ("torch", "sklearn", "onnx", "PIL", "matplotlib"):
    sys.modules[name] = None  # importing any of them now raises ModuleNotFoundError
from edge_qmul.cli import main

state, root, key = sys.argv[1:4]
codes = [main(["device", "init", "--state", state, "--dataset", "imagefolder", "--data-root", root,
               "--fleet-key", key]),
         main(["device", "forget", "--state", state, "--class", "3"]),
         main(["device", "forget", "--state", state, "--all"]),
         main(["device", "status", "--state", state])]
codes.append(main(["train", "--run", state + "-run"]))
loaded = sorted(m for m in ("torch", "sklearn", "onnx", "PIL", "matplotlib", "flwr") if sys.modules.get(m) is not None)
print(json.dumps({"codes": codes, "loaded": loaded}))
"""


def test_device_verbs_run_with_torch_unimportable(tmp_path: Path, folder: tuple[Path, list[Path], np.ndarray]
                                                  ) -> None:
    proc = subprocess.run([sys.executable, "-c", LEAN, str(tmp_path / "state"), str(folder[0]), fleet_key()],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0, 0, 0, 2] and result["loaded"] == []
    assert "edge-qmul train: error: torch is not installed: pip install 'edge-qmul[server]'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "state-run").exists()


def test_a_missing_submodule_of_an_installed_package_is_still_a_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_qmul.cli as cli_module

    def broken(c: object) -> int:
        raise ModuleNotFoundError("No module named 'torch.nonexistent'", name="torch.nonexistent")

    monkeypatch.setitem(cli_module.COMMANDS, "status", broken)
    with pytest.raises(ModuleNotFoundError):
        main(["status", "--run", "x"])


def test_errors_are_typed(device: DeviceState) -> None:
    with pytest.raises(EdgeQmulError) as info:
        device.forget(label=99)
    assert info.value.exit_code == 5


# ---- what the network side reads: held-out pool, covered samples, pixels, installed models ----------


def test_held_out_pool_covered_samples_and_pixels(tmp_path: Path, npz_file: Path) -> None:
    server = data.load_dataset("npz", npz_file)
    assert server.test is not None
    train_ids, test_ids = data.content_ids(server.train), data.content_ids(server.test)
    with DeviceState.init(tmp_path / "s", DataSpec("npz", npz_file), fleet_key()) as d:
        assert sorted(d.held_out()) == sorted(test_ids)
        assert sorted(d.contributed_pool()) == sorted(set(train_ids) - set(test_ids))
        some = d.forget(hashes=train_ids[:4])
        klass = d.forget(label=int(server.train.labels[10]))
        leave = d.forget(leave=True)
        assert d.covered() == []  # nothing acknowledged yet
        d.mark(some.request_id, "acknowledged")
        d.mark(klass.request_id, "refused", "not-owner: test")
        assert d.covered() == sorted(set(train_ids[:4]))
        cover = d.request_hashes([leave.request_id, klass.request_id])
        assert sorted(cover[leave.request_id]) == sorted(d.contributed_pool())
        assert set(cover[klass.request_id]) == {h for h, y in zip(train_ids + test_ids, list(server.train.labels)
                                                                   + list(server.test.labels), strict=True)
                                                if y == server.train.labels[10]}
        with pytest.raises(ForgetRequestError, match="no request"):
            d.request_hashes(["f" * 32])
        picked = [test_ids[3], train_ids[7], train_ids[0]]
        images, labels, scale = d.pixels(picked)
        assert images.dtype == np.uint8 and images.shape == (3, *server.train.images.shape[1:])
        np.testing.assert_array_equal(images[0], server.test.images[3])
        np.testing.assert_array_equal(images[1], server.train.images[7])
        assert labels.tolist() == [server.test.labels[3], server.train.labels[7], server.train.labels[0]]
        assert scale == server.train.scale
        with pytest.raises(ForgetRequestError, match="not among this device's samples"):
            d.pixels(["0" * 64])


def test_pixels_of_an_image_folder_and_a_changed_file(device: DeviceState, folder: tuple[Path, list[Path], np.ndarray],
                                                      tmp_path: Path) -> None:
    root, paths, _ = folder
    server = data.load_dataset("imagefolder", root)
    ids = data.content_ids(server.train)
    images, labels, scale = device.pixels(ids[5:8])
    np.testing.assert_array_equal(images, server.train.images[5:8])
    assert labels.tolist() == server.train.labels[5:8].tolist() and scale == 255.0
    assert device.held_out() == []  # one pool: nothing held out
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(root, copy)
    with DeviceState.init(tmp_path / "s2", DataSpec("imagefolder", copy), fleet_key()) as d2:
        target = copy / paths[0].relative_to(root)
        other = copy / paths[1].relative_to(root)
        target.write_bytes(other.read_bytes())  # the file's content changed since init
        with pytest.raises(DataError, match="changed or vanished"):
            d2.pixels([hashlib.sha256(paths[0].read_bytes()).hexdigest()])


def test_models_install_atomically_and_roll_back(device: DeviceState, tmp_path: Path) -> None:
    files = tmp_path / "bundle"
    files.mkdir()
    (files / "model.onnx").write_bytes(b"v1")
    assert device.model_dir() is None and device.installed() == []
    path = device.install_model("m-1", files)
    assert device.model_dir() == path and (path / "model.onnx").read_bytes() == b"v1"
    (files / "model.onnx").write_bytes(b"v2")
    device.install_model("m-2", files, parent="m-1")
    assert device.status().active_model == "m-2" and device.status().parent_model == "m-1"
    assert (device.model_dir("m-1") / "model.onnx").read_bytes() == b"v1"  # type: ignore[operator]
    device.activate("m-1")
    assert device.status().active_model == "m-1" and device.status().parent_model == "m-2"
    assert device.installed() == ["m-1", "m-2"]
    with pytest.raises(ConfigError, match="not installed"):
        device.activate("m-3")
    with pytest.raises(ConfigError, match="not a version name"):
        device.model_dir("../escape")
    assert not [p for p in (device.dir / "models").iterdir() if p.name.startswith(".")]  # no temp dirs left
