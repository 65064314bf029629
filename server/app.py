"""The coordinator's Flower ServerApp: settings from the run config, then the round loop."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import Federation
from server.settings import ServerSettings

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = ServerSettings.from_run_config(context.run_config)
    Federation(grid, settings, run_id=context.run_id).run()
