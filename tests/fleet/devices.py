"""A fleet of devices with their own data, and the server run trained on what they contributed.

``make_fleet(root, n)`` writes, from scikit-learn digits (8x8 grayscale, duplicates dropped so every sample
has its own content id):

- per device ``i``: ``device<i>.npz`` with ``x_train`` (the samples it contributes to training) and ``x_test``
  (its held-out pool, never contributed), set up with ``edge-qmul device init --dataset npz`` into the
  state dir ``state<i>`` with the fleet's public key pinned;
- ``server.npz``: the devices' ``x_train`` together, plus server-only test samples;
- ``provenance.csv``: ``device_id,sha256`` for each device's samples that the server's split puts in training
  (its validation share is in no one's training set, so no provenance names it);
- ``run``: a digits-sized model trained on ``server.npz`` with ``edge-qmul train --provenance`` (and quantized
  unless asked not to), so ``receive`` checks every request against who contributed what;
- ``keys``: the fleet's signing key (``edge-qmul keygen``), whose public half every device pins.

Tests copy a fleet (``copy_fleet``) before changing anything: the device states and the run are both mutable.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edge_qmul import content, data


@dataclass(frozen=True)
class Fleet:
    root: Path
    run: Path
    keys: Path  # signing_key.pem, public_key.hex
    states: list[Path]  # one DeviceState dir per device, in device order
    device_ids: list[str]
    npz: list[Path]
    trained: list[list[str]]  # per device: content ids it contributed that the server trained on
    held_out: list[list[str]]  # per device: content ids of its held-out pool (x_test)

    @property
    def fleet_key(self) -> str:
        return (self.keys / "public_key.hex").read_text().strip()


def _unique_digits() -> tuple[np.ndarray, np.ndarray]:
    from imagedata import digits_uint8

    images, labels = digits_uint8()
    seen: set[str] = set()
    keep = []
    for i, image in enumerate(images):
        h = content.hash_pixels(image)
        if h not in seen:
            seen.add(h)
            keep.append(i)
    order = np.random.default_rng(0).permutation(np.asarray(keep))
    return images[order], labels[order]


def make_fleet(root: Path, n: int = 3, *, train: int = 400, held_out: int = 100, epochs: int = 3,
               quantize: bool = True) -> Fleet:
    """``n`` devices with ``train`` contributed and ``held_out`` kept samples each; see the module docstring."""
    from edge_qmul.devices.state import DeviceState

    from edge_qmul.cli import main

    images, labels = _unique_digits()
    per = train + held_out
    if n * per + 50 > len(images):
        raise ValueError(f"{n} devices x {per} samples need more than the {len(images)} unique digits")
    root.mkdir(parents=True, exist_ok=True)
    assert main(["keygen", "--out", str(root / "keys")]) == 0
    fleet_key = (root / "keys" / "public_key.hex").read_text().strip()
    states, ids, npzs = [], [], []
    for i in range(n):
        lo = i * per
        npz = root / f"device{i}.npz"
        np.savez(npz, x_train=images[lo:lo + train], y_train=labels[lo:lo + train],
                 x_test=images[lo + train:lo + per], y_test=labels[lo + train:lo + per])
        state = root / f"state{i}"
        assert main(["device", "init", "--state", str(state), "--dataset", "npz", "--data-root", str(npz),
                     "--fleet-key", fleet_key]) == 0
        with DeviceState.open(state) as d:
            ids.append(d.device_id)
        states.append(state)
        npzs.append(npz)
    server = root / "server.npz"
    contributed = np.concatenate([images[i * per:i * per + train] for i in range(n)])
    contributed_y = np.concatenate([labels[i * per:i * per + train] for i in range(n)])
    np.savez(server, x_train=contributed, y_train=contributed_y, x_test=images[n * per:], y_test=labels[n * per:])
    source = data.load_dataset("npz", server)
    training = set(np.asarray(data.content_ids(source.train))[data.make_split(source, 0).train].tolist())
    trained, kept = [], []
    rows = ["device_id,sha256"]
    for i in range(n):
        mine = [content.hash_pixels(x) for x in images[i * per:i * per + train]]
        trained.append([h for h in mine if h in training])
        kept.append([content.hash_pixels(x) for x in images[i * per + train:i * per + per]])
        rows += [f"{ids[i]},{h}" for h in trained[-1]]
    (root / "provenance.csv").write_text("\n".join(rows) + "\n")
    run = root / "run"
    assert main(["train", "--run", str(run), "--dataset", "npz", "--data-root", str(server), "--epochs", str(epochs),
                 "--provenance", str(root / "provenance.csv"), "--quiet"]) == 0
    if quantize:
        assert main(["quantize", "--run", str(run), "--calibration-size", "256", "--quiet"]) == 0
    return Fleet(root, run, root / "keys", states, ids, npzs, trained, kept)


def copy_fleet(fleet: Fleet, dst: Path) -> Fleet:
    """A copy of the run and of every device state (the devices' .npz files are read-only and shared)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(fleet.run, dst / "run")
    states = []
    for state in fleet.states:
        shutil.copytree(state, dst / state.name)
        states.append(dst / state.name)
    return replace(fleet, root=dst, run=dst / "run", states=states)
