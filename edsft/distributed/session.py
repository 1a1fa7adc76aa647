"""Connecting to (or starting) the Ray cluster every distributed stage runs on."""

from __future__ import annotations

import os

import ray

from ..config import Config


def init_ray(cfg: Config) -> None:
    """Join ``ray.address`` (or the cluster of a ``ray job submit``), else start a local one.

    Inside a job or a Tune trial Ray is already initialised: nothing to do. Credentials are
    never passed through the runtime env (Ray records it in its logs): a local cluster's workers
    inherit this process's environment, cluster nodes bring their own (instance roles).
    """
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory,
                 include_dashboard=False, log_to_driver=True, configure_logging=False)
        pin_address()


def pin_address() -> None:
    """Point helper processes (Ray Train's placement-group cleaner, Tune) at *this* cluster.

    With several Ray clusters on one machine, a bare ``ray.init()`` in a helper process fails
    with "Found multiple active Ray instances"; RAY_ADDRESS removes the ambiguity.
    """
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
