"""The Flower ServerApp: reads the run config and runs one forget round (``coordinator.run_round``)."""

from __future__ import annotations

import logging

from edge_qmul.federated.config import FederatedConfig
from edge_qmul.federated.coordinator import run_rollout_round, run_round
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def _show_logs() -> None:
    """Route edge_qmul's log records to stderr, which the SuperLink keeps for `flwr log`."""
    logger = logging.getLogger("edge_qmul")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


@app.main()
def main(grid: Grid, context: Context) -> None:
    _show_logs()
    cfg = FederatedConfig.from_run_config(context.run_config)
    if cfg.mode == "rollout":
        run_rollout_round(grid, cfg, flower_run_id=context.run_id)
        return
    run_round(grid, cfg, flower_run_id=context.run_id)
