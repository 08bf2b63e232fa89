"""Can the cluster ever place the workers the config asks for? Asked of Ray before any work.

Ray waits forever for resources a fixed cluster does not have (``cluster.num_workers=64`` on 2
CPUs gave no answer in 4 minutes), so a run that cannot fit fails at once, naming the key, the
resources per worker and what the cluster has. An autoscaling cluster (``cluster.autoscale``)
may still grow: there the run waits, logging what is pending, up to a timeout.
"""

from __future__ import annotations

import logging
import time

from operators.errors import UserError

log = logging.getLogger("lancet")
EPS = 1e-9  # Ray's fractional resources are decimals: 0.5 + 0.5 must fit in 1.0
# Ray Data's tasks (reading the corpus for the factor and IBO workers, feeding the scorers) ask
# for one CPU each; with no CPU left beside the workers they never run and the stage waits
# forever (2 workers x 1 CPU on 2 CPUs: fit_factors stayed at 0/568 sequences for 4 minutes).
DATA_CPUS = 1.0


class CapacityError(UserError):
    """The cluster cannot place the configured workers."""


def workers_that_fit(nodes: list[dict[str, float]], cpus: float, gpus: float) -> int:
    """How many workers of ``cpus`` CPUs and ``gpus`` GPUs the nodes' totals hold (a worker
    lives on one node, so node capacities do not add up across nodes)."""
    total = 0
    for res in nodes:
        fits = int(res.get("CPU", 0.0) / cpus + EPS)
        if gpus > 0:
            fits = min(fits, int(res.get("GPU", 0.0) / gpus + EPS))
        total += fits
    return total


def shortfall(nodes: list[dict[str, float]], num_workers: int, cpus: float, gpus: float
              ) -> str | None:
    """None when ``num_workers`` fit with a CPU to spare for Ray Data, else a sentence saying
    what is asked and what there is."""
    fits = workers_that_fit(nodes, cpus, gpus)
    if fits >= num_workers:
        return _no_cpu_for_data(nodes, num_workers, cpus)
    per_worker = f"CPU: {cpus:g}" + (f", GPU: {gpus:g}" if gpus > 0 else "")
    has = {key: sum(n.get(key, 0.0) for n in nodes) for key in ("CPU", "GPU")}
    return (f"cluster.num_workers={num_workers} needs {num_workers} workers x {{{per_worker}}} "
            f"(cluster.cpus_per_worker, cluster.gpus_per_worker); the cluster has "
            f"{{CPU: {has['CPU']:g}, GPU: {has['GPU']:g}}} on {len(nodes)} node(s), where "
            f"{fits} such workers fit")


def _no_cpu_for_data(nodes: list[dict[str, float]], num_workers: int, cpus: float) -> str | None:
    total = sum(n.get("CPU", 0.0) for n in nodes)
    if total - num_workers * cpus + EPS >= DATA_CPUS:
        return None
    return (f"cluster.num_workers={num_workers} x cluster.cpus_per_worker={cpus:g} take "
            f"{num_workers * cpus:g} of the cluster's {total:g} CPUs; Ray Data needs "
            f"{DATA_CPUS:g} CPU beside the workers to read the data, or the stages wait for it "
            "forever")


def alive_nodes() -> list[dict[str, float]]:
    import ray
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def wait_for_capacity(num_workers: int, cpus: float, gpus: float, autoscale: bool,
                      timeout_s: float, poll_s: float = 10.0) -> None:
    """Return once the workers fit; raise ``CapacityError`` at once on a fixed cluster, or
    after ``timeout_s`` on an autoscaling one (logging what is pending every ``poll_s``)."""
    began = time.monotonic()
    while (missing := shortfall(alive_nodes(), num_workers, cpus, gpus)) is not None:
        hint = "lower cluster.num_workers or the resources per worker"
        if not autoscale:
            raise CapacityError(f"{missing}: {hint}, or set cluster.autoscale=true on an "
                                "autoscaling cluster")
        waited = time.monotonic() - began
        if waited >= timeout_s:
            raise CapacityError(f"{missing} after waiting {waited:.0f} s for the autoscaler "
                                f"(cluster.autoscale_timeout_s): {hint}")
        log.info(f"waiting for the autoscaler ({waited:.0f}/{timeout_s:.0f} s): {missing}")
        time.sleep(poll_s)
