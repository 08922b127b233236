"""Training provenance: which device contributed which training samples.

The fleet's training data is the run's split.json 'train' list, cut into ``num_partitions`` contiguous
chunks in list order (that order is already a seeded shuffle, so chunks are IID). Partition ``p`` is what
device ``p`` contributed. Server and devices compute the same assignment from the same split, so the
server can check ownership without trusting anything a device says about its data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from edge_qmul.errors import ConfigError

SCHEME = "contiguous/1"  # recorded with the provenance so a future scheme change is detected, not mixed


def _check(n_train: int, num_partitions: int) -> None:
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        raise ConfigError(f"num-partitions must be a positive integer, got {num_partitions!r}")
    if num_partitions > n_train:
        raise ConfigError(
            f"num-partitions={num_partitions} exceeds the {n_train} training samples",
            "use fewer partitions than training samples",
        )


def bounds(n_train: int, num_partitions: int, partition_id: int) -> tuple[int, int]:
    """[start, stop) of partition ``partition_id`` in the train list."""
    _check(n_train, num_partitions)
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) or not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id must be in 0..{num_partitions - 1}, got {partition_id!r}")
    return partition_id * n_train // num_partitions, (partition_id + 1) * n_train // num_partitions


def partition(train: Sequence[int], num_partitions: int, partition_id: int) -> list[int]:
    """The training-pool indices device ``partition_id`` contributed (in train order)."""
    start, stop = bounds(len(train), num_partitions, partition_id)
    return [int(i) for i in train[start:stop]]


def assignment(train: Sequence[int], num_partitions: int) -> dict[int, int]:
    """sample id -> partition id for every training sample."""
    out: dict[int, int] = {}
    for p in range(num_partitions):
        for i in partition(train, num_partitions, p):
            out[i] = p
    return out


def train_fingerprint(train: Sequence[int]) -> str:
    """Hash of the train list (its order matters). split.json's forget list changes as requests arrive;
    the train list does not, so provenance is keyed to this rather than to the file's hash."""
    return hashlib.sha256(json.dumps([int(i) for i in train]).encode()).hexdigest()
