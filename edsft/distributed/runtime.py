"""What the running Ray cluster offers, and how big model actors should be on it."""

from __future__ import annotations

from dataclasses import dataclass

import ray

from ..config import ScoringConfig


def cluster_resources() -> dict[str, float]:
    """Total resources of the connected cluster (CPU, GPU, memory, ...)."""
    return dict(ray.cluster_resources())


def cluster_gpus() -> int:
    return int(cluster_resources().get("GPU", 0))


def cpu_only_cluster() -> bool:
    return cluster_gpus() == 0


@dataclass(frozen=True)
class ActorPlan:
    """Resources of one model actor and the size of the actor pool."""

    num_cpus: float
    num_gpus: float
    min_actors: int
    max_actors: int
    device: str  # cuda | cpu
    num_threads: int | None  # torch threads inside the actor (1 on CPU: actors share the cores)

    @property
    def concurrency(self) -> tuple[int, int]:
        return (self.min_actors, self.max_actors)


def model_actor_plan(scoring: ScoringConfig, gpus: int | None = None) -> ActorPlan:
    """One actor per GPU on GPU clusters; fractional-CPU actors otherwise.

    ``scoring.num_gpus_per_actor > 0`` is used as given. When it is 0 and the cluster has GPUs,
    each actor takes one whole GPU and the pool grows to one actor per GPU (``num_actors`` is
    raised to the GPU count). On CPU-only clusters actors take ``cpus_per_actor`` (fractional:
    a whole CPU per actor on a small cluster leaves no CPU for the read tasks feeding them,
    which deadlocks) and run torch with one thread.
    """
    gpus = cluster_gpus() if gpus is None else gpus
    if scoring.num_gpus_per_actor > 0 or gpus > 0:
        per = scoring.num_gpus_per_actor or 1.0
        most = max(scoring.num_actors, int(gpus // per)) if scoring.num_gpus_per_actor == 0 else scoring.num_actors
        most = max(1, most)
        return ActorPlan(num_cpus=1.0, num_gpus=per, min_actors=min(scoring.min_actors, most), max_actors=most,
                         device="cuda", num_threads=None)
    most = max(1, scoring.num_actors)
    return ActorPlan(num_cpus=scoring.cpus_per_actor, num_gpus=0.0, min_actors=min(scoring.min_actors, most),
                     max_actors=most, device="cpu", num_threads=1)
