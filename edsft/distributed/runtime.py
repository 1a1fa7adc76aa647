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


def cpus_per_node() -> int:
    """CPUs of the smallest alive node (what one node's actors share)."""
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return max(1, int(min(cpus))) if cpus else 1


@dataclass(frozen=True)
class ActorPlan:
    """Resources of one model actor and the size of the actor pool."""

    num_cpus: float
    num_gpus: float
    min_actors: int
    max_actors: int
    device: str  # cuda | cpu
    num_threads: int | None  # torch threads inside a CPU actor: the node's cores split over the actors

    @property
    def concurrency(self) -> tuple[int, int]:
        return (self.min_actors, self.max_actors)


def model_actor_plan(scoring: ScoringConfig, gpus: int | None = None, node_cpus: int | None = None) -> ActorPlan:
    """One actor per GPU on GPU clusters; fractional-CPU actors otherwise.

    ``scoring.num_gpus_per_actor > 0`` is used as given. When it is 0 and the cluster has GPUs,
    each actor takes one whole GPU and the pool grows to one actor per GPU (``num_actors`` is
    raised to the GPU count). On CPU-only clusters actors take ``cpus_per_actor`` (fractional:
    a whole CPU per actor on a small cluster leaves no CPU for the read tasks feeding them,
    which deadlocks) and split the node's cores between them as torch threads (``node_cpus //
    num_actors``, at least 1; one thread when the node size is not known): a single actor on a
    2-core node used to run one thread and leave a core idle.
    """
    if gpus is None:
        gpus = cluster_gpus()
        node_cpus = cpus_per_node() if node_cpus is None else node_cpus
    if scoring.num_gpus_per_actor > 0 or gpus > 0:
        per = scoring.num_gpus_per_actor or 1.0
        most = max(scoring.num_actors, int(gpus // per)) if scoring.num_gpus_per_actor == 0 else scoring.num_actors
        most = max(1, most)
        return ActorPlan(
            num_cpus=1.0, num_gpus=per, min_actors=min(scoring.min_actors, most), max_actors=most, device="cuda", num_threads=None
        )
    most = max(1, scoring.num_actors)
    return ActorPlan(
        num_cpus=scoring.cpus_per_actor,
        num_gpus=0.0,
        min_actors=min(scoring.min_actors, most),
        max_actors=most,
        device="cpu",
        num_threads=max(1, (node_cpus or 1) // most),
    )
