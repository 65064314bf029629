"""Running the project's ServerApp and ClientApp on Flower's Simulation Engine (Ray).

The simulator starts its own local SuperLink in simulation mode and submits the app with
``flwr run``, as a researcher would by hand: no deprecated entry points, the same
components as a real deployment. Virtual hospitals get their data through a manifest (see
client/partition.py). Ray gets a private temporary directory per run (a stale
``ray_current_cluster`` file from a killed cluster makes later runs hang), explicit
resources sized to the machine, and the whole run a deadline: a crashed Ray runtime ends
the run with an error instead of a hang.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from client.partition import Partition, SimulationManifest
from hymate.processes import free_port
from server.app_source import AppSourceError, staged_app
from server.run_dir import RunDirectory
from server.superlink import SuperLink, SuperLinkError

log = logging.getLogger(__name__)


class SimulationError(RuntimeError):
    """A simulated federation failed or timed out; carries the ServerApp's last words."""


@dataclass(frozen=True)
class EngineSettings:
    """Where and how big: Ray resources, an optional existing cluster, and a deadline."""

    cpus_per_client: int = 1
    ray_address: str | None = None  # an existing Ray cluster ("HOST:PORT"); default: a private local one
    timeout: float = 3600.0

    def check_cluster(self, timeout: float = 5.0) -> None:
        """Fail now, naming the address, when nothing listens at ``ray_address``.

        Why: Ray's driver retries an unreachable head until the run's deadline, so a typo in
        --ray-address would cost the whole ``timeout`` before it said anything. ``auto`` (Ray's
        own lookup of a local cluster) and addresses without a port are left to Ray.
        """
        host, _, port = (self.ray_address or "").rpartition(":")
        if not host or not port.isdigit():
            return
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
        except OSError as e:
            raise SimulationError(
                f"no Ray cluster answers at {self.ray_address} ({e.strerror or e}): start one there with "
                "`ray start --head`, or leave out --ray-address for a private local cluster"
            ) from None

    def federation_config(self, n_sites: int) -> str:
        # Flower's flwr-run path wants whole CPUs per client; on 2 cores, 1 CPU gives the two
        # concurrent actors measured fastest there. init-args would make Ray start a local
        # cluster, which must not happen when an existing one is given.
        items = [f"num-supernodes={n_sites}", f"client-resources-num-cpus={self.cpus_per_client}"]
        if not self.ray_address:
            items.append(f"init-args-num-cpus={os.cpu_count() or 1}")
        items.append('init-args-logging-level="ERROR"')
        return " ".join(items)


def simulate_federation(
    dataset: str,
    data: str | None,
    dataset_options: dict,
    partitions: dict[str, list[str]],
    run_config: dict,
    run_dir: Path,
    engine: EngineSettings,
    split_seed: int = 0,
    privacy: dict | None = None,
    min_sites: int | None = None,
    on_progress: Callable[[list[int]], None] | None = None,
) -> RunDirectory:
    """Federate over ``partitions`` (site name -> stay ids); returns the finished run directory.

    ``dataset_options``: the ``load_dataset`` keywords each virtual site loads the dataset with
    (source options, and ``cache_dir``: the parsed-data cache, None for none).

    ``privacy``: DP settings every virtual site trains with (``DPSettings`` fields such as
    ``epsilon``); ``min_sites``: sites that must reply each round (default: all of them).
    """
    runs = RunDirectory(Path(run_dir).resolve())
    runs.path.mkdir(parents=True, exist_ok=True)
    manifest_path = runs.simulation_manifest_file
    SimulationManifest(
        dataset=dataset,
        data=str(Path(data).resolve()) if data else None,
        state_root=str(runs.site_state_root),
        partitions=[Partition(name, list(ids)) for name, ids in partitions.items()],
        split_seed=split_seed,
        dataset_options=dataset_options,
        privacy=privacy or {},
    ).save(manifest_path)
    config = dict(run_config) | {
        "run-dir": str(runs.path),
        "simulation-manifest": str(manifest_path),
        "min-clients": min(min_sites or len(partitions), len(partitions)),
    }
    config_file = runs.superlink_run_config_file
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(tomli_w.dumps(config))

    ray_tmp = Path(tempfile.mkdtemp(prefix="hymate-ray-"))  # short: Ray's socket paths have a length limit
    env = {"RAY_ADDRESS": engine.ray_address} if engine.ray_address else {"RAY_TMPDIR": str(ray_tmp)}
    superlink = SuperLink(runs.superlink_dir, "127.0.0.1", free_port(), tls=None, simulation=True, env=env)
    try:
        superlink.start()
        with staged_app() as app:
            run_id = superlink.run_app(app, config_file, engine.federation_config(len(partitions)))
        status = superlink.wait_for_run(
            run_id,
            engine.timeout,
            on_poll=(lambda: on_progress(runs.completed_rounds())) if on_progress else None,
            finished_hint=runs.is_finished,
        )
        if status != "finished:completed":
            raise SimulationError(f"simulation ended as {status}:\n{superlink.run_log(run_id)[-3000:]}")
    except (SuperLinkError, AppSourceError) as e:
        raise SimulationError(str(e)) from e
    finally:
        superlink.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return runs
