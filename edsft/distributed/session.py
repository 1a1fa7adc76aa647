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

    ``log_to_driver=True``: Ray forwards the workers' stdout/stderr to this process, where the
    CLI's console (:mod:`edsft.console`) has pointed fd 1/2 at ``<output.dir>/logs/edsft.log``, so
    a run's log holds its workers' output next to the driver's (``--verbose`` also shows it live);
    the full per-process logs stay in Ray's session folder (``/tmp/ray/session_*/logs``).
    """
    keep_credentials_out_of_runtime_envs()
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    else:
        ray.init(
            num_cpus=cfg.ray.num_cpus,
            object_store_memory=cfg.ray.object_store_memory,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
        )
        pin_address()


def pin_address() -> None:
    """Point helper processes (Ray Train's placement-group cleaner, Tune) at *this* cluster.

    With several Ray clusters on one machine, a bare ``ray.init()`` in a helper process fails
    with "Found multiple active Ray instances"; RAY_ADDRESS removes the ambiguity.
    """
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


# Ray Tune copies these from the driver's environment into every trial actor's runtime env
# (ray/tune/execution/class_cache.py), and Ray's runtime-env agent logs each runtime env verbatim
# (logs/runtime_env_agent.log): a secret key would end up in the session logs. Trials get
# credentials like every other worker instead: inherited from this process on a local cluster,
# from the instance role on cluster nodes.
_CREDENTIAL_VARS = frozenset(
    {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN", "WANDB_API_KEY"}
)


def keep_credentials_out_of_runtime_envs() -> None:
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # another Ray layout: nothing to patch
        return
    class_cache.ENV_VARS_TO_PROPAGATE = frozenset(class_cache.ENV_VARS_TO_PROPAGATE) - _CREDENTIAL_VARS
