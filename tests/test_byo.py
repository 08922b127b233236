"""Bring your own model and data (issue 12): a model defined in this file, an image folder of real PNGs,
the CLI end to end (import weights → quantize → forget by hash → unlearn qmul → export → validate → bundle),
the same flow through the Python API, and one clear error per bad model / weights / data, with nothing
written."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from imagedata import write_image_folder
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

from edge_qmul.cli import main
from edge_qmul.store import SampleStore

NUM_CLASSES = 10


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.pw(self.relu1(self.bn1(self.dw(x)))))


class TinyNet(nn.Module):
    """Depthwise-separable convs, a residual add and a head named ``classifier``."""

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = DepthwiseSeparable(16, 16)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.relu(self.block(x) + x)  # residual add
        return self.classifier(torch.flatten(self.pool(x), 1))


def build(num_classes: int, in_channels: int) -> nn.Module:
    return TinyNet(num_classes, in_channels)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gate(x).flatten(1))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return x
        return -x


def build_untraceable() -> nn.Module:
    return Untraceable()


class NoInt8Kernel(nn.Module):
    """A SiLU between two convs: no int8 kernel in the x86 backend, so it would run in float."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(256, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(self.act(self.conv(x))).flatten(1))


def build_no_int8() -> nn.Module:
    return NoInt8Kernel()


def build_for_32px(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, num_classes))


HERE = Path(__file__).resolve()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scikit-learn's digits as real 8x8 grayscale PNG files in class sub-folders."""
    digits = load_digits()
    images = (np.asarray(digits.images) * (255.0 / 16.0)).round().astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    root = tmp_path_factory.mktemp("pics")
    write_image_folder(root, images, np.asarray(digits.target), [str(i) for i in range(10)])
    return root


@pytest.fixture(scope="module")
def weights(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The team's own training, outside edge-qmul: a TinyNet trained on the folder's pixels."""
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor((np.asarray(digits.images) * (255.0 / 16.0)).round() / 255.0, dtype=torch.float32)[:, None]
    y = torch.tensor(digits.target)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        for idx in torch.randperm(len(x)).split(128):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for m in model.modules():  # BatchNorm statistics of the whole set, as a careful team would ship them
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model(x)
    path = tmp_path_factory.mktemp("w") / "tinynet.pt"
    torch.save(model.state_dict(), path)
    return path


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_end_to_end_with_a_model_from_this_file(folder: Path, weights: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    spec = f"{HERE}:build"
    base = ["--run", str(run), "--quiet"]
    assert main(["import", *base, "--dataset", "imagefolder", "--data-root", str(folder), "--model", spec,
                 "--weights", str(weights), "--head", "classifier"]) == 0
    out = capsys.readouterr().out
    assert "imported weights" in out
    float_test = float(out.split("test ")[1].split("%")[0])
    assert float_test > 90.0  # the team's weights, evaluated on the run's test split

    assert main(["quantize", *base]) == 0
    # forget by content: the sha256 of 12 PNG files of class 3 that the model was trained on, as a device
    # holding those files would name them
    hashes = tmp_path / "hashes.txt"
    hashes.write_text("".join(h + "\n" for h in _training_hashes(run, folder / "3")[:12]))
    assert main(["forget", *base, "--hashes", str(hashes), "--request-id", "user-7"]) == 0
    assert "12 samples recorded" in capsys.readouterr().out
    assert main(["unlearn", *base, "--method", "qmul"]) == 0
    assert main(["export", *base]) == 0
    assert main(["validate", *base, "--device", "x86-server"]) == 0
    assert main(["keygen", "--out", str(tmp_path / "keys")]) == 0
    key = tmp_path / "keys" / "signing_key.pem"
    assert main(["bundle", *base, "--device", "x86-server", "--key", str(key)]) == 0
    assert len(list((run / "bundles").glob("*.tar"))) == 1
    capsys.readouterr()
    assert main(["status", "--run", str(run)]) == 0
    assert "ledger: 1 requests (12 samples)" in capsys.readouterr().out


def readme_examples() -> list[str]:
    """The ```python blocks of the README's "Python API" section, exactly as a reader copies them."""
    text = (HERE.parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_has_the_in_memory_and_the_run_directory_examples() -> None:
    blocks = readme_examples()
    assert len(blocks) == 2
    assert all(len(b.strip().splitlines()) <= 15 for b in blocks)  # the whole flow in <= 15 lines


def test_the_python_api_flow(weights: Path, tmp_path: Path) -> None:
    import edge_qmul as eq

    digits = load_digits()
    x = torch.tensor(np.asarray(digits.images) / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(digits.target)
    scope: dict[str, Any] = {"torch": torch, "TinyNet": TinyNet, "weights": weights, "x": x, "y": y,
                             "tmp_path": tmp_path}
    exec(readme_examples()[0], scope)  # the README's in-memory example, verbatim
    q, q2, report, model, retain = (scope[k] for k in ("q", "q2", "report", "model", "retain"))
    assert q2.head == "classifier"
    assert report.metrics["parity_top1"] >= 99.0
    assert report.metrics["FA"] < 100.0  # Q-MUL moved the forgotten samples
    assert report.checks["ta_drop"]["value"] is not None
    with torch.no_grad():  # the input model and the first Quantized are untouched
        assert torch.equal(q.int8(x[:4]), eq.quantize(model, retain[0][:512]).int8(x[:4]))


@pytest.mark.parametrize(("model", "message", "code"), [
    ("build_untraceable", "in module 'gate'", 2),
    ("build_no_int8", "act (SiLU)", 8),
    ("build_for_32px", "rejects input of shape [2, 1, 8, 8]", 2),
    ("no_such_factory", "has no callable 'no_such_factory'", 2),
])
def test_a_bad_model_is_refused_by_name_and_nothing_is_written(folder: Path, tmp_path: Path, model: str, message: str,
                                                               code: int, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    argv = ["train", "--run", str(run), "--quiet", "--dataset", "imagefolder", "--data-root", str(folder),
            "--model", f"{HERE}:{model}", "--epochs", "1"]
    if code == 8:  # trains, then quantize refuses the float layer
        assert main(argv) == 0
        before = _files(run)
        assert main(["quantize", "--run", str(run), "--quiet"]) == code
        assert _files(run) == before
    else:
        assert main(argv) == code
        assert not run.exists()
    err = capsys.readouterr().err
    assert message in err and "fix:" in err


def test_weights_that_do_not_fit_are_listed(folder: Path, weights: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    state = torch.load(weights, weights_only=True)
    state["classifier.weight"] = torch.zeros(5, 16)
    del state["stem.0.weight"]
    state["extra.bias"] = torch.zeros(3)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    run = tmp_path / "run"
    code = main(["import", "--run", str(run), "--dataset", "imagefolder", "--data-root", str(folder),
                 "--model", f"{HERE}:build", "--weights", str(bad)])
    err = capsys.readouterr().err
    assert code == 4
    assert "missing: stem.0.weight" in err and "unexpected: extra.bias" in err and "classifier.weight [5, 16]" in err
    assert not run.exists()
    pickle_file = tmp_path / "evil.pt"
    torch.save({"x": object()}, pickle_file)  # not loadable with weights_only=True
    assert main(["import", "--run", str(run), "--dataset", "imagefolder", "--data-root", str(folder),
                 "--model", f"{HERE}:build", "--weights", str(pickle_file)]) == 4
    assert not run.exists()


def _corrupt_image(root: Path) -> tuple[list[str], str]:
    victim = sorted((root / "4").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:20])
    return ["--data-root", str(root)], victim.name


def _mixed_sizes(root: Path) -> tuple[list[str], str]:
    odd = sorted((root / "2").glob("*.png"))[0]
    Image.new("L", (9, 9)).save(odd)
    return ["--data-root", str(root)], "--image-size"


def _empty_class(root: Path) -> tuple[list[str], str]:
    (root / "zz-empty").mkdir()
    return ["--data-root", str(root)], "zz-empty"


def _labels_out_of_range(root: Path) -> tuple[list[str], str]:
    digits = load_digits()
    x = (np.asarray(digits.images) * 15).astype(np.uint8)
    y = np.asarray(digits.target).copy()
    y[5] = -1
    path = root.parent / "bad.npz"
    np.savez(path, x_train=x[:1500], y_train=y[:1500], x_test=x[1500:], y_test=np.asarray(digits.target)[1500:])
    return ["--dataset", "npz", "--data-root", str(path)], "y_train"


@pytest.mark.parametrize("damage", [_corrupt_image, _mixed_sizes, _empty_class, _labels_out_of_range])
def test_bad_data_is_refused_and_nothing_is_written(folder: Path, tmp_path: Path, damage: Any,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    flags, named = damage(broken)
    run = tmp_path / "run"
    assert main(["train", "--run", str(run), "--dataset", "imagefolder", *flags, "--model", f"{HERE}:build"]) == 3
    err = capsys.readouterr().err
    assert named in err and "fix:" in err
    assert not run.exists()


def test_forget_by_a_hash_the_run_never_saw_is_refused(folder: Path, weights: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["import", "--run", str(run), "--quiet", "--dataset", "imagefolder", "--data-root", str(folder),
                 "--model", f"{HERE}:build", "--weights", str(weights)]) == 0
    hashes = tmp_path / "h.txt"
    hashes.write_text("0" * 64 + "\n")
    before = _files(run)
    assert main(["forget", "--run", str(run), "--hashes", str(hashes)]) == 5
    assert "is not a sample of this run's dataset" in capsys.readouterr().err
    assert _files(run) == before


def test_the_run_api_flow(folder: Path, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edge_qmul as eq

    # what the README's reader has: a folder of images, a model file, its weights, a key, a user's hashes
    monkeypatch.chdir(tmp_path)
    shutil.copytree(folder, "pics")
    Path("my_net.py").write_text(f"import sys\nsys.path.insert(0, {str(HERE.parent)!r})\nfrom test_byo import build\n")
    shutil.copy(weights, "my_net.pt")
    key_path, _ = eq.keygen(tmp_path / "keys")
    scope: dict[str, Any] = {"eq": eq, "key_path": key_path}
    probe = eq.Run(tmp_path / "probe")  # the hashes a device holding 15 training images of class 7 would send
    probe.train(eq.DataConfig("imagefolder", root="pics"), eq.TrainConfig(model="my_net.py:build"), weights="my_net.pt")
    scope["hashes"] = _training_hashes(probe.root, Path("pics") / "7")[:15]
    exec(readme_examples()[1], scope)  # the README's run-directory example, verbatim
    run, report = scope["run"], scope["report"]
    assert report.passed
    assert len(list(run.path("bundles").glob("*.tar"))) == 1
    with run.ledger() as ledger:
        (request,) = ledger.requests()
    assert request.request_id == "user-42" and request.source == "api" and len(request.sample_ids) == 15
    assert run.forget_ids() == sorted(request.sample_ids)  # the forget set lives in the ledger only
    assert "forget" not in json.loads(run.path("split").read_text())
    assert run.model_version().startswith("qmul-")


def _training_hashes(run: Path, class_dir: Path) -> list[str]:
    train_ids = json.loads((run / "split.json").read_text())["train"]
    with SampleStore(run / "samples.sqlite") as store:
        trained = set(store.hashes(train_ids).values())
    return [h for h in (hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(class_dir.glob("*.png")))
            if h in trained]
