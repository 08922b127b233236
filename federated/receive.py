"""The server's side of a device's request queue: signed requests in, one answer per request out.

A device (``edge_qmul.devices.state``) sends the entries of ``DeviceState.pending()``: each is the canonical JSON
body it signed and its Ed25519 signature. The device id in the body *is* the device's public key, and the
run's training provenance (``edge_qmul.provenance``) names contributors by that id, so a request that verifies
under the key it names comes from the device that contributed the samples, with no separate registry.

For each entry, in order: the signature and the canonical form (``verify_request``); the entry's request id
against the body's; then the request is filed with ``pipeline.forget(..., device=...)``, which checks every
hash against the provenance (a hash the device did not contribute, or one outside the training set, is
refused) and records it in the forget ledger (SQLite, synchronous=FULL). A batch is filed through one ledger
and one sample-store connection, in one transaction (``Ledger.batch``: each request its own savepoint, so a
refused one leaves the others) committed before any answer is returned, so an "acknowledged" always describes
a durable row. Sending the same signed entry again is answered
"acknowledged" again (the ledger is idempotent by request id); a request id reused with other samples is
refused. A class request names all the device's local samples of the class; those never trained on (its
held-out samples) are skipped, the rest must all be its own. Reasons are codes plus the error's message;
payloads and hashes never appear in logs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from edge_qmul.devices.state import verify_request

from edge_qmul import pipeline
from edge_qmul.errors import ConfigError, ForgetRequestError, LedgerError
from edge_qmul.ledger import Ledger
from edge_qmul.run import Run
from edge_qmul.store import SampleStore

log = logging.getLogger(__name__)

MAX_HASHES = 1_000_000  # per request: more than any device holds; bounds what one message can make us look up


@dataclass(frozen=True)
class Answer:
    request_id: str
    status: str  # "acknowledged" | "refused"
    reason: str = ""  # refused: a code ("bad-signature", "not-owner", ...) and the message
    recorded: bool = False  # acknowledged: True the first time, False for a repeat of a recorded request

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def receive(run_dir: Run | Path, entries: Iterable[Mapping[str, Any]], *,
            run_data: pipeline.RunData | None = None) -> list[Answer]:
    """File each signed device request in the run's forget ledger; one answer per entry, in order.

    ``run_data``: the run's ``pipeline.load_run_data``, loaded once by a caller that receives many batches (a
    round over the fleet); without it the batch loads it once (not once per request: it holds the training pool).
    """
    run = Run(run_dir) if not isinstance(run_dir, Run) else run_dir
    entries = list(entries)
    if not entries:
        return []
    if run_data is None:
        run_data = pipeline.load_run_data(run)
    # a run without a sample store has no provenance: each request is then refused as before, by pipeline.forget
    samples = SampleStore(run.path("samples")) if run.exists("samples") else nullcontext(None)
    with run.ledger() as ledger, samples as store, ledger.batch():  # committed before the answers are returned
        answers = [_one(run, entry, run_data, ledger, store) for entry in entries]
    return answers


def _trained_subset(run: Run, store: SampleStore | None, hashes: list[str]) -> list[str]:
    """The hashes that some device contributed to training (the provenance holds exactly those)."""
    with nullcontext(store) if store is not None else SampleStore(run.require("samples")) as opened:
        owners = opened.owners(hashes)
    return [h for h in hashes if h in owners]


def _one(run: Run, entry: Mapping[str, Any], run_data: pipeline.RunData, ledger: Ledger,
         store: SampleStore | None) -> Answer:
    claimed = str(entry.get("request_id", ""))[:64] if isinstance(entry, Mapping) else ""
    try:
        body = verify_request(entry)
    except ForgetRequestError as err:
        log.warning("refused request %s: bad-signature", claimed or "(no id)")
        return Answer(claimed, "refused", f"bad-signature: {err.message}")
    rid, device, kind = str(body.get("request_id", "")), str(body["device_id"]), body.get("kind")
    if rid != claimed:
        return Answer(claimed, "refused", "mismatch: the entry's request id is not the signed one")
    hashes = body.get("hashes") or []
    if not isinstance(hashes, list) or len(hashes) > MAX_HASHES or not all(isinstance(h, str) for h in hashes):
        return Answer(rid, "refused", "malformed: hashes must be a list of content ids")
    file = partial(pipeline.forget, run, device=device, request_id=rid, source="device", run_data=run_data,
                   ledger=ledger, store=store)
    try:
        if kind == "leave":
            receipt = file(leave=True)
        elif kind == "samples":
            receipt = file(hashes=hashes)
        elif kind == "class":  # names the device's local samples of the class (its class ids need not be ours)
            trained = _trained_subset(run, store, hashes)  # its held-out samples of the class were never trained on
            if not trained:
                return Answer(rid, "refused", "nothing-to-forget: no sample of the class was trained on")
            receipt = file(hashes=trained)
        else:
            return Answer(rid, "refused", f"malformed: unknown request kind {kind!r}")
    except (ForgetRequestError, ConfigError) as err:
        code = "not-owner" if "contributed" in err.message or "provenance" in err.message else "refused"
        log.warning("refused request %s of device %s: %s", rid, device[:16], code)
        return Answer(rid, "refused", f"{code}: {err.message}")
    except LedgerError as err:  # a request id reused with other samples; I/O errors propagate (nothing acked)
        if "already recorded" not in err.message:
            raise
        return Answer(rid, "refused", f"conflict: {err.message}")
    log.info("request %s of device %s: %s (%d samples)", rid, device[:16],
             "recorded" if receipt.added else "already recorded", receipt.samples)
    return Answer(rid, "acknowledged", recorded=receipt.added)
