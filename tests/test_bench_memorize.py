"""The memorizing benchmark's protocol pieces (bench/memorize.py): the noise floor, equal tuning budgets, the
selection rule, the paired bootstrap and the summary; and a smoke run of the whole script (slow)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "memorize.py"


@pytest.fixture(scope="module")
def memorize():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("memorize_bench", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["memorize_bench"] = module
    spec.loader.exec_module(module)
    return module


def _m(fa: float, ra: float, ta: float, mia: float) -> dict:
    return {"FA": fa, "RA": ra, "TA": ta, "MIA": mia}


def test_every_method_and_scope_gets_the_same_tuning_budget(memorize) -> None:  # type: ignore[no-untyped-def]
    labels = [c[0] for c in memorize.CANDIDATES]
    assert len(labels) == len(set(labels))
    assert all(len(c[3]) == memorize.GRID_SIZE for c in memorize.CANDIDATES)
    methods = {c[1] for c in memorize.CANDIDATES}
    assert {"qmul", "salun", "scrub", "l1_sparse", "finetune", "random_label", "grad_ascent", "famr"} <= methods
    for method in methods - {"qmul"}:  # every baseline in head-only and full-network form
        layers = {c[2]["layers"] for c in memorize.CANDIDATES if c[1] == method}
        assert layers == {"classifier", "all"}, method
    assert {c[2]["layers"] for c in memorize.CANDIDATES if c[1] == "qmul"} == {"classifier", "last-1-blocks", "all"}


def test_noise_floor_is_each_reference_against_the_others(memorize) -> None:  # type: ignore[no-untyped-def]
    refs = [_m(80, 100, 80, 20), _m(82, 100, 80, 20), _m(84, 100, 80, 20)]
    fs = memorize.ForgetSet("s", torch.zeros(3, dtype=torch.bool), refs)
    # FA gaps: |80-83|, |82-82|, |84-81| -> 3, 0, 3; divided by the 4 metrics
    assert memorize.noise_floor(fs) == pytest.approx([0.75, 0.0, 0.75])
    assert memorize.noise_floor(memorize.ForgetSet("s", fs.mask, refs[:1])) == []


def test_paired_bootstrap_over_forget_sets(memorize) -> None:  # type: ignore[no-untyped-def]
    a = {"s0": [1.0, 1.2], "s1": [0.8, 1.0], "s2": [1.1, 0.9]}
    better = {k: [v + 2.0 for v in vs] for k, vs in a.items()}
    d = memorize.bootstrap_diff(a, better)
    assert d["diff"] == pytest.approx(-2.0) and d["high"] < 0
    noisy = {"s0": [1.5, 1.5], "s1": [0.3, 0.3], "s2": [1.0, 1.0]}
    d = memorize.bootstrap_diff(a, noisy)
    assert d["low"] < 0 < d["high"]  # not separated


def test_selection_prefers_the_smallest_gap_within_a_tenth_of_retrain(memorize, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    grid = ({"lr": 1}, {"lr": 2}, {"lr": 3}, {"lr": 4})
    outcome = {1: (0.5, 20.0), 2: (0.9, 5.0), 3: (0.7, 9.0), 4: (2.0, 1.0)}  # (gap, seconds); retrain 100 s

    def fake_run(b, deployed, fs, cfg, split):  # type: ignore[no-untyped-def]
        assert split == "val"  # tuning never reads the test split
        gap, seconds = outcome[int(cfg.lr)]
        return {"avg_gap": gap, "seconds": 2 * seconds, "cpu_seconds": seconds}  # wall time: a busy machine

    monkeypatch.setattr(memorize, "run_method", fake_run)
    monkeypatch.setattr(memorize, "config_of", lambda m, f, p, s: type("C", (), {"lr": p["lr"]})())
    fs = memorize.ForgetSet("t", torch.zeros(1, dtype=torch.bool), [{"seconds": 100.0, "cpu_seconds": 100.0}])
    chosen = memorize.tune(None, None, [fs], [("x", "qmul", {}, grid)], lambda msg: None)
    assert chosen["x"]["point"] == {"lr": 3}  # lr 1 is closer but costs 20% of retrain (in CPU time)
    outcome.update({2: (float("nan"), 50.0), 3: (0.7, 30.0), 4: (2.0, 11.0)})  # none within budget now
    chosen = memorize.tune(None, None, [fs], [("x", "qmul", {}, grid)], lambda msg: None)
    assert chosen["x"]["point"] == {"lr": 1}  # the closest anyway; a failed run (NaN) is never chosen
    # a point within budget that ends farther from retrain than doing nothing is a collapse, not a candidate
    outcome.update({1: (0.5, 20.0), 2: (12.0, 5.0), 3: (0.7, 30.0), 4: (2.0, 11.0)})
    chosen = memorize.tune(None, None, [fs], [("x", "qmul", {}, grid)], lambda msg: None, untouched_gap=10.0)
    assert chosen["x"]["point"] == {"lr": 1}  # not lr 2, the only point within budget


def test_summary_reports_ratios_and_the_best_qmul_scope(memorize) -> None:  # type: ignore[no-untyped-def]
    def row(gap: float, seconds: float) -> dict:
        return {**_m(90, 99, 85, 10), "avg_gap": gap, "seconds": seconds, "cpu_seconds": seconds}

    rows = {
        "retrain": {"s0": [row(0.4, 100), row(0.6, 100)], "s1": [row(0.5, 100), row(0.5, 100)]},
        "none": {"s0": [row(5, 0)], "s1": [row(6, 0)]},
        "qmul classifier": {"s0": [row(3, 1)], "s1": [row(3.2, 1)]},
        "qmul all": {"s0": [row(0.7, 8)], "s1": [row(0.8, 8)]},
    }
    s = memorize.summarise(rows)
    assert s["retrain"]["avg_gap"] == pytest.approx(0.5) and s["qmul all"]["time_ratio"] == pytest.approx(0.08)
    assert s["_best_qmul"] == "qmul all"
    assert s["_paired"]["none"]["high"] < 0 and "retrain" not in s["_paired"]
    text = memorize.markdown({
        "title": "t", "original": {"model": "m", "params": 10, "head_params": 1, "head_share": 10.0,
                                   "train_acc": 99.9, "int8_test_acc": 80.0, "train": 1, "val": 1, "test": 1},
        "provenance": {"commit": "abc", "uncommitted_changes": False, "date": "d", "versions": {
            "torch": "t", "onnxruntime": "o"}, "threads": 1, "cores": 2, "argv": [], "seeds": {"unlearning": [0]}},
        "scenarios": {"random 10%": {"summary": s, "rows": rows, "sets": ["s0", "s1"], "chosen": {},
                                     "tuning_sets": ["t0"]}},
    })
    assert "Noise floor (retrain vs retrain): 0.50" in text and "Best Q-MUL scope: **qmul all**" in text


@pytest.mark.slow
def test_quick_run_writes_results_with_provenance(tmp_path: Path, memorize) -> None:  # type: ignore[no-untyped-def]
    code = memorize.main(["--quick", "--scenarios", "random", "--methods", "qmul classifier", "qmul all",
                          "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--threads", "2"])
    assert code == 0
    result = json.loads((tmp_path / "memorize-random-quick.json").read_text())
    assert {"commit", "versions", "seeds", "date"} <= set(result["provenance"])
    sc = result["scenarios"]["random 10%"]
    assert sc["complete"] and set(sc["summary"]) >= {"none", "retrain", "qmul classifier", "qmul all"}
    assert np.isfinite(sc["summary"]["qmul all"]["avg_gap"])
    assert len(sc["rows"]["retrain"]["random-r0"]) == 2  # --quick: 2 references
    assert "Noise floor" in (tmp_path / "memorize-random-quick.md").read_text()
    # --resume: a run that stopped after its first reported set continues from its results file; the tuning and
    # the finished set are kept as measured, the rest is run.
    partial = json.loads(json.dumps(result))
    part = partial["scenarios"]["random 10%"]
    for by_set in part["rows"].values():
        by_set.pop("random-r1", None)
    part["sets"], part["complete"] = ["random-r0"], False
    stopped = tmp_path / "stopped.json"
    stopped.write_text(json.dumps(partial))
    code = memorize.main(["--quick", "--scenarios", "random", "--methods", "qmul classifier", "qmul all",
                          "--out", str(tmp_path / "resumed"), "--cache", str(tmp_path / "cache"), "--threads", "2",
                          "--resume", str(stopped)])
    assert code == 0
    again = json.loads((tmp_path / "resumed" / "memorize-random-quick.json").read_text())
    sc2 = again["scenarios"]["random 10%"]
    assert again["provenance"]["resumed_from"]["commit"] == result["provenance"]["commit"]
    assert sc2["complete"] and sc2["sets"] == ["random-r0", "random-r1"]
    assert sc2["chosen"] == sc["chosen"]  # not tuned again
    assert sc2["rows"]["qmul all"]["random-r0"] == sc["rows"]["qmul all"]["random-r0"]  # kept as measured
    assert len(sc2["rows"]["qmul all"]["random-r1"]) == 1 and len(sc2["rows"]["retrain"]["random-r1"]) == 2
    assert "Resumed" in (tmp_path / "resumed" / "memorize-random-quick.md").read_text()
    # --only-sets: two processes measure disjoint reported sets, each into its own --out (the tuning resumed
    # from the stopped run); a last --resume of both files merges them without measuring anything again.
    tuned = json.loads(json.dumps(partial))
    for by_set in tuned["scenarios"]["random 10%"]["rows"].values():
        by_set.pop("random-r0", None)
    tuned["scenarios"]["random 10%"]["sets"] = []
    only_tuned = tmp_path / "tuned.json"
    only_tuned.write_text(json.dumps(tuned))
    parts = []
    for name in ("random-r0", "random-r1"):
        code = memorize.main(["--quick", "--methods", "qmul classifier", "qmul all", "--out", str(tmp_path / name),
                              "--cache", str(tmp_path / "cache"), "--threads", "2", "--resume", str(only_tuned),
                              "--only-sets", name])
        assert code == 0
        parts.append(tmp_path / name / "memorize-quick.json")
        part = json.loads(parts[-1].read_text())
        assert list(part["scenarios"]) == ["random 10%"]  # the class scenario has none of the sets: skipped
        assert part["scenarios"]["random 10%"]["sets"] == [name]
    code = memorize.main(["--quick", "--scenarios", "random", "--methods", "qmul classifier", "qmul all",
                          "--out", str(tmp_path / "merged"), "--cache", str(tmp_path / "cache"), "--threads", "2",
                          "--resume", *map(str, parts), "--only-sets", "random"])  # a whole scenario
    assert code == 0
    merged = json.loads((tmp_path / "merged" / "memorize-random-quick.json").read_text())
    sc3 = merged["scenarios"]["random 10%"]
    assert sc3["complete"] and sc3["sets"] == ["random-r0", "random-r1"]
    assert len(merged["provenance"]["merged_from"]) == 2
    for name, path in zip(("random-r0", "random-r1"), parts, strict=True):
        one = json.loads(path.read_text())["scenarios"]["random 10%"]
        assert sc3["rows"]["qmul all"][name] == one["rows"]["qmul all"][name]  # kept as measured
    assert "Merged from 2 runs" in (tmp_path / "merged" / "memorize-random-quick.md").read_text()
    # --refresh: a file whose "qmul all" was chosen by another rule is re-selected from its stored grid with the
    # current rule; that row and auto's are measured again, the rest is kept as measured
    file = tmp_path / "merged" / "memorize-random-quick.json"
    stale = json.loads(file.read_text())
    chosen = stale["scenarios"]["random 10%"]["chosen"]["qmul all"]
    rule = chosen["point"]
    chosen["point"] = next(t["point"] for t in chosen["trials"] if t["point"] != rule)
    file.write_text(json.dumps(stale))
    code = memorize.main(["--quick", "--scenarios", "random", "--out", str(tmp_path / "merged"),
                          "--cache", str(tmp_path / "cache"), "--threads", "2", "--refresh"])
    assert code == 0
    fresh = json.loads(file.read_text())
    sc4 = fresh["scenarios"]["random 10%"]
    assert sc4["chosen"]["qmul all"]["point"] == rule
    assert sc4["chosen"]["qmul all"]["point_before_refresh"] != rule
    assert sc4["rows"]["qmul classifier"] == sc3["rows"]["qmul classifier"]  # kept as measured
    assert sc4["rows"]["retrain"] == sc3["rows"]["retrain"]
    assert all(len(rs) == 1 for rs in sc4["rows"]["auto (escalating)"].values())
    assert fresh["provenance"]["refreshed"][0]["refreshed"][0]["rows"] == ["auto (escalating)", "qmul all"]
    assert "Refreshed (`--refresh`)" in (tmp_path / "merged" / "memorize-random-quick.md").read_text()
    # --supplement with a ladder: chosen on the tuning sets by the same rule, then run on the reported sets
    ladder = [{"layers": "classifier", "lr": lr, "epochs": 1} for lr in (0.001, 0.01)]
    code = memorize.main(["--quick", "--scenarios", "random", "--out", str(tmp_path / "merged"),
                          "--cache", str(tmp_path / "cache"), "--threads", "2",
                          "--supplement", f"scrub low lr=scrub:{json.dumps(ladder)}"])
    assert code == 0
    sc5 = json.loads(file.read_text())["scenarios"]["random 10%"]
    extra = sc5["supplement_tuning"]["scrub low lr"]
    assert [t["point"] for t in extra["trials"]] == ladder and extra["point"] in ladder
    assert set(sc5["rows"]["scrub low lr"]) == {"random-r0", "random-r1"}
    assert sc5["rows"]["qmul classifier"] == sc3["rows"]["qmul classifier"]
    assert "Supplementary ladders" in (tmp_path / "merged" / "memorize-random-quick.md").read_text()
