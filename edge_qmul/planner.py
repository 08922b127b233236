"""Hybrid planner (ARCHITECTURE.md §4.3): exact unlearning by replay when it is cheap, Q-MUL otherwise.

**Generations.** With ``TrainConfig.generations = G > 1`` the training list is cut into G generations
(contiguous chunks of split.json's ``train`` order, fixed at training time and recorded per sample in
``generations.json``), standing for batches of data that reached the fleet over time. The model is
updated as each arrives: phase g continues from the weights after phase g-1 and trains on generation g
with the recipe (its epochs and cosine schedule, a fresh SGD optimizer, every random draw seeded by
(seed, g)), so the whole run costs what one-shot training costs. The weights after every phase are saved
(``generations/phase-<g>.pt``) with the phase's measured throughput.

**Exact unlearning.** Forgetting samples whose earliest generation is k = resume from the checkpoint after
phase k-1 (or from the seeded initialisation when k = 0) and replay phases k..G-1 without them. Phases
before k never saw the samples, and each phase depends only on its starting weights, its data and its
seed, so the result equals, bit for bit, training from scratch on the data without those samples
(deterministic CPU kernels, same thread count).

**The decision** (``plan``): the exact estimate is the replay's training steps x a training-step time
plus the quantization time; the approximate estimate is Q-MUL's step count x a Q-MUL step time plus its
conversion. Both step times are measured side by side just before deciding (a few probe steps each, on
the real model and data), so a busy machine slows both alike; the quantization time is the one
``quantize`` measured for this run. ``auto`` takes the cheaper one and records both estimates, the choice
and the measured time.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edge_qmul.errors import CheckpointError
from edge_qmul.models import ModelConfig, build_model
from edge_qmul.progress import Progress
from edge_qmul.train import TrainConfig, batch_indices, cosine_lr, load_payload, sgd

PHASE_FORMAT = "edge-qmul/generation-checkpoint/1"


def assign_generations(train: list[int], generations: int) -> list[list[int]]:
    """Contiguous chunks of the train list (already a seeded shuffle), one per generation."""
    n = len(train)
    return [train[g * n // generations : (g + 1) * n // generations] for g in range(generations)]


def phase_epochs(cfg: TrainConfig) -> int:
    return cfg.epochs


@dataclass
class PhaseLog:
    phase: int
    samples: int
    epochs: int
    seconds: float

    @property
    def throughput(self) -> float:
        """Training samples per second (samples x epochs / seconds)."""
        return self.samples * self.epochs / max(self.seconds, 1e-9)


def train_phases(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    pool_x: torch.Tensor,
    pool_y: torch.Tensor,
    generations: list[list[int]],
    *,
    exclude: frozenset[int] = frozenset(),
    start_phase: int = 0,
    start_state: dict[str, torch.Tensor] | None = None,
    checkpoint_dir: Path | None = None,
    quiet: bool = True,
) -> tuple[nn.Module, list[PhaseLog]]:
    """Train phases ``start_phase``..G-1 (from ``start_state``, or the seeded initialisation at phase 0).

    ``pool_x`` / ``pool_y`` are indexed by sample id; ``generations`` lists each generation's sample ids;
    ``exclude`` (forgotten samples) is left out of every phase. Writes each phase's weights to
    ``checkpoint_dir`` when given.
    """
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    if start_state is not None:
        model.load_state_dict(start_state)
    elif start_phase != 0:
        raise CheckpointError("replay from a later phase needs the weights before it", "pass start_state")
    epochs = phase_epochs(cfg)
    logs: list[PhaseLog] = []
    with Progress(quiet) as progress:
        for g in range(start_phase, len(generations)):
            ids = [i for i in generations[g] if i not in exclude]
            x, y = pool_x[ids], pool_y[ids]
            torch.manual_seed(cfg.seed * 1000 + g)
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + g)
            opt = sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay)
            total, step = epochs * math.ceil(len(ids) / cfg.batch_size), 0
            task = progress.add(f"phase {g} ({len(ids)} samples)", total)
            t0 = time.perf_counter()
            model.train()
            for _ in range(epochs):
                for idx in batch_indices(len(ids), cfg.batch_size, gen):
                    for group in opt.param_groups:
                        group["lr"] = cosine_lr(cfg.lr, step, total)
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    progress.advance(task)
            model.eval()
            logs.append(PhaseLog(g, len(ids), epochs, time.perf_counter() - t0))
            if checkpoint_dir is not None:
                save_phase(checkpoint_dir, g, model)
    return model, logs


def save_phase(checkpoint_dir: Path, phase: int, model: nn.Module) -> None:
    import io

    from edge_qmul.atomic import write_bytes

    buf = io.BytesIO()
    torch.save({"format": PHASE_FORMAT, "phase": phase, "state_dict": model.state_dict()}, buf)
    write_bytes(checkpoint_dir / f"phase-{phase}.pt", buf.getvalue())


def load_phase(checkpoint_dir: Path, phase: int) -> dict[str, torch.Tensor]:
    fix = "re-train the run with generations (the checkpoints are part of its training record)"
    payload = load_payload(checkpoint_dir / f"phase-{phase}.pt", f"generation checkpoint {phase}", fix)
    if payload.get("format") != PHASE_FORMAT or payload.get("phase") != phase:
        raise CheckpointError(f"{checkpoint_dir / f'phase-{phase}.pt'} is not generation checkpoint {phase}", fix)
    return dict(payload["state_dict"])


@dataclass
class Plan:
    choice: str  # "exact" | "approximate"
    first_affected: int  # earliest generation holding a forgotten sample
    replay_phases: list[int]
    exact_seconds: float  # estimates
    approx_seconds: float
    replay_samples: int  # samples x epochs the replay would train on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(
    generations: list[list[int]],
    forget: set[int],
    cfg: TrainConfig,
    step_seconds: float,
    quantize_seconds: float,
    approx_seconds: float,
) -> Plan:
    """Exact replay's estimate (its training steps x a measured step time, plus quantization) against the
    approximate estimate; the cheaper one wins."""
    first = min((g for g, ids in enumerate(generations) if forget & set(ids)), default=len(generations))
    epochs = phase_epochs(cfg)
    kept = [len([i for i in generations[g] if i not in forget]) for g in range(first, len(generations))]
    steps = sum(epochs * math.ceil(n / cfg.batch_size) for n in kept)
    exact = steps * step_seconds + quantize_seconds
    return Plan("exact" if exact <= approx_seconds else "approximate", first, list(range(first, len(generations))),
                exact, approx_seconds, epochs * sum(kept))
