"""Training provenance by content: which device contributed which training sample.

A provenance file is a CSV with the header ``device_id,sha256`` and one row per contributed sample: the
device's id (in a fleet, the hex of its Ed25519 public key, ``edge-qmul device status`` prints it; any
name without commas or spaces works for other setups) and the sample's content id (``edge_qmul.content``:
the sha256 of its image file's bytes, or of its uint8 pixels). The same content may be contributed by
several devices; each of them owns it.

``train`` / ``import`` read it with ``read_csv``, check every hash against the training set and store the
pairs in the run's sample store (``SampleStore.record_provenance``); ownership checks then use hashes only
(``SampleStore.check_owned``): a request for a hash the training set does not hold is refused, and so is one
for a hash the requesting device did not contribute.

Standard library only (the device side may import it).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from edge_qmul.content import is_sha256_hex
from edge_qmul.errors import DataError

HEADER = ("device_id", "sha256")
_DEVICE_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
FIX = ("write a CSV with the header 'device_id,sha256' and one row per sample: the contributing device's id "
       "and the sample's content id (64 lowercase hex digits, e.g. `sha256sum FILE` of an image file)")


def read_csv(path: str | Path) -> list[tuple[str, str]]:
    """(device id, content id) pairs of a provenance CSV, duplicates removed, in file order.

    One error for the first bad line, naming the file and line: a missing or wrong header, a row without
    exactly two fields, a device id with spaces, commas or other characters, or a hash that is not 64 hex
    digits (upper case is accepted and lowered).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the provenance file {path}: {exc}", FIX) from exc
    rows = list(csv.reader(text.splitlines()))
    if not rows or tuple(c.strip().lower() for c in rows[0]) != HEADER:
        got = ",".join(rows[0]) if rows else "an empty file"
        raise DataError(f"{path}: line 1 must be the header 'device_id,sha256', got {got!r}", FIX)
    pairs: dict[tuple[str, str], None] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue  # blank line
        if len(row) != 2:
            raise DataError(f"{path}:{number}: expected 2 fields (device_id,sha256), got {len(row)}", FIX)
        device, sha = row[0].strip(), row[1].strip().lower()
        if not _DEVICE_ID.fullmatch(device):
            raise DataError(f"{path}:{number}: device id {device!r} is not 1-128 of A-Z a-z 0-9 . _ : @ -", FIX)
        if not is_sha256_hex(sha):
            raise DataError(f"{path}:{number}: {row[1].strip()!r} is not a sha256 content id", FIX)
        pairs[(device, sha)] = None
    if not pairs:
        raise DataError(f"{path} lists no samples", FIX)
    return list(pairs)


def check_in_training_set(pairs: list[tuple[str, str]], training_ids: set[str], path: str | Path) -> None:
    """Refuse a provenance that names a sample the training set does not hold (listing a few of them)."""
    missing = sorted({sha for _, sha in pairs if sha not in training_ids})
    if missing:
        shown = ", ".join(m[:16] + "…" for m in missing[:3])
        raise DataError(
            f"{path}: {len(missing)} content id(s) are not in the training set ({shown})",
            "list only samples of the training split (validation and test samples are never trained on); content "
            "ids are the sha256 of each image file's bytes, or of its uint8 pixels for arrays",
        )
