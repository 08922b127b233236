"""Where does `edge-qmul unlearn --method qmul` spend its time? cProfile of the whole verb, by stage.

The unlearn stage of time-to-forget is what a user waits for: loading the run (checkpoint, split,
dataset files, feature cache), the Q-MUL loop itself (similar labels, gradient-norm statistics,
training steps), re-conversion to int8 and saving the result. This script runs the verb under
cProfile on the Fashion-MNIST benchmark run, for a small request (20 samples) and a 10% request
(5,400 samples), and attributes the wall time to those stages (cumulative time of the function
that implements each one). The same runs without the profiler give the wall times.

    python bench/profile_unlearn.py       # ~5 min (trains the benchmark run if it is not there)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path
from typing import Any

import torch
from qmul_vs_retrain import forget_sets, fresh_copy, prepare

from edge_qmul import pipeline
from edge_qmul.config import method_config

# stage -> (file suffix, function name) whose cumulative time is the stage's time
STAGES: dict[str, tuple[str, str]] = {
    "whole verb (run_unlearn)": ("edge_qmul/pipeline.py", "run_unlearn"),
    "load checkpoint (load_quantized)": ("edge_qmul/pipeline.py", "load_quantized"),
    "load dataset + split (load_run_data)": ("edge_qmul/pipeline.py", "load_run_data"),
    "gather pixel tensors (RunData.tensors)": ("edge_qmul/pipeline.py", "tensors"),
    "load feature cache (load_features)": ("edge_qmul/pipeline.py", "load_features"),
    "Q-MUL loop (Method.run)": ("edge_qmul/methods.py", "run"),
    "  similar labels + g_f/g_r (begin_epoch)": ("edge_qmul/methods.py", "begin_epoch"),
    "  training steps (train_steps)": ("edge_qmul/methods.py", "train_steps"),
    "  re-convert to int8 (quant.convert)": ("edge_qmul/quant.py", "convert"),
    "save result (save_result)": ("edge_qmul/pipeline.py", "save_result"),
}


# What this profile led to (the "before" figures are this script's output at commit d518044):
CHANGES = """\
Changed after the first profile (profiled whole verb 5.84 s / 5.99 s for 20 / 5400 samples, of which the
feature-cache load took 1.00 s / 0.89 s and gathering pixel tensors 0.35 s / 0.32 s):

- the feature cache is dequantized in place (one float buffer per set instead of three ~300 MB temporaries
  for the retain set; the page faults of those were the 0.76 s of own time in its row function);
- a head-only method on cached features loads labels, not pixels, for the retain and val sets (it never reads
  them); `tests/test_pipeline.py` checks that the result is bit-identical to computing features afresh.

What is left is the Q-MUL loop itself: ~1,060 small steps of the fake-quant head (backward, per-channel weight
fake-quant and observers, GEMM), each about 3.5 ms.
"""


def stage_seconds(stats: pstats.Stats) -> dict[str, float]:
    table: dict[tuple[str, str], float] = {}
    for (path, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        key = (path.replace("\\", "/"), name)
        table[key] = table.get(key, 0.0) + ct
    out = {}
    for stage, (suffix, name) in STAGES.items():
        out[stage] = sum(ct for (path, fn), ct in table.items() if fn == name and path.endswith(suffix))
    return out


def top_functions(stats: pstats.Stats, n: int = 12) -> list[dict[str, Any]]:
    rows = []
    for (path, line, name), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(path).name}:{line}({name})", "calls": nc, "own_s": tt, "cum_s": ct})
    return sorted(rows, key=lambda r: r["own_s"], reverse=True)[:n]


def profile_case(run: Path, label: str) -> dict[str, Any]:
    cfg = method_config("qmul")
    t0 = time.perf_counter()
    meta = pipeline.run_unlearn(run, cfg, quiet=True)  # unprofiled: the wall time
    wall = time.perf_counter() - t0
    prof = cProfile.Profile()
    prof.enable()
    pipeline.run_unlearn(run, cfg, quiet=True)
    prof.disable()
    stats = pstats.Stats(prof)
    stages = stage_seconds(stats)
    total = stages["whole verb (run_unlearn)"]
    print(f"\n{label}: wall {wall:.2f} s (method's own clock {meta.seconds:.2f} s); profiled {total:.2f} s")
    for stage, s in stages.items():
        print(f"  {stage:<44} {s:7.2f} s  {100 * s / total:5.1f}%")
    return {"case": label, "wall_s": wall, "method_s": meta.seconds, "stages": stages,
            "top_own_time": top_functions(stats)}


def markdown(cases: list[dict[str, Any]]) -> str:
    lines = [
        "# Profile of `edge-qmul unlearn --method qmul`, Fashion-MNIST small CNN (2 cores)",
        "",
        "Cumulative time of the function implementing each stage, under cProfile (the profiler adds"
        " overhead; the unprofiled wall time is given per case). Indented stages are part of the Q-MUL loop.",
        "",
        "| stage | " + " | ".join(c["case"] for c in cases) + " |",
        "|---|" + "---|" * len(cases),
    ]
    for stage in STAGES:
        cells = [f"{c['stages'][stage]:.2f} s ({100 * c['stages'][stage] / c['stages'][next(iter(STAGES))]:.0f}%)"
                 for c in cases]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append("| unprofiled wall time | " + " | ".join(f"{c['wall_s']:.2f} s" for c in cases) + " |")
    lines.append("| method's own clock (log seconds) | " + " | ".join(f"{c['method_s']:.2f} s" for c in cases) + " |")
    lines += ["", CHANGES]
    for c in cases:
        lines += ["", f"Most own time, {c['case']}:", "", "| function | calls | own s | cumulative s |",
                  "|---|---|---|---|"]
        lines += [f"| `{r['function']}` | {r['calls']} | {r['own_s']:.2f} | {r['cum_s']:.2f} |"
                  for r in c["top_own_time"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    base = args.runs / "bench-fmnist"
    prepare(base, args.quiet)
    reported, _ = forget_sets(base)
    cases = []
    for label, ids in (("20 samples", reported[:20]), (f"{len(reported)} samples", reported)):
        run = fresh_copy(base, args.runs / f"bench-profile-{len(ids)}", ids, f"profile-{len(ids)}")
        cases.append(profile_case(run, label))

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_unlearn.json").write_text(json.dumps(cases, indent=1) + "\n")
    (args.out / "profile_unlearn.md").write_text(markdown(cases))
    print(f"\nwrote {args.out / 'profile_unlearn.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
