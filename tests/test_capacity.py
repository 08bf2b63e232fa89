"""Workers the cluster can never place fail at once, naming the key and the resources; an
autoscaling cluster is waited for, with a progress line and a timeout (Ray's answer faked)."""

import logging

import pytest

from cluster import capacity
from cluster.capacity import CapacityError, shortfall, wait_for_capacity, workers_that_fit

TWO_CPUS = [{"CPU": 2.0, "memory": 1e9}]


def test_workers_fit_per_node_with_fractional_cpus_and_gpus():
    assert workers_that_fit(TWO_CPUS, 0.5, 0) == 4
    assert workers_that_fit([{"CPU": 1.5}, {"CPU": 1.5}], 1.0, 0) == 2  # not 3: one node each
    assert workers_that_fit([{"CPU": 8.0, "GPU": 1.0}], 1.0, 1.0) == 1
    assert workers_that_fit([{"CPU": 0.3 * 10}], 0.3, 0) == 10  # decimal rounding
    assert shortfall(TWO_CPUS, 2, 0.5, 0) is None


def test_workers_that_take_every_cpu_leave_none_for_ray_data_and_are_refused():
    assert shortfall(TWO_CPUS, 4, 0.5, 0) == (
        "cluster.num_workers=4 x cluster.cpus_per_worker=0.5 take 2 of the cluster's 2 CPUs; "
        "Ray Data needs 1 CPU beside the workers to read the data, or the stages wait for it "
        "forever")
    assert shortfall(TWO_CPUS, 2, 1.0, 0) is not None  # seen hanging in fit_factors
    assert shortfall([{"CPU": 32.0, "GPU": 8.0}], 8, 4.0, 1.0) is not None  # 8 GPUs x 4 CPUs
    assert shortfall([{"CPU": 33.0, "GPU": 8.0}], 8, 4.0, 1.0) is None


def test_a_fixed_cluster_that_is_too_small_fails_at_once(monkeypatch):
    monkeypatch.setattr(capacity, "alive_nodes", lambda: TWO_CPUS)
    monkeypatch.setattr(capacity.time, "sleep", lambda s: pytest.fail("waited"))
    with pytest.raises(CapacityError) as err:
        wait_for_capacity(64, 0.5, 0.0, autoscale=False, timeout_s=60)
    text = str(err.value)
    assert "cluster.num_workers=64 needs 64 workers x {CPU: 0.5}" in text
    assert "the cluster has {CPU: 2, GPU: 0} on 1 node(s), where 4 such workers fit" in text
    assert "cluster.autoscale=true" in text


def test_an_autoscaling_cluster_is_waited_for_and_times_out(monkeypatch, caplog):
    grown = [TWO_CPUS, TWO_CPUS, [{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 2.0}]]
    monkeypatch.setattr(capacity, "alive_nodes", lambda: grown.pop(0) if len(grown) > 1 else grown[0])
    monkeypatch.setattr(capacity.time, "sleep", lambda s: None)
    with caplog.at_level(logging.INFO, logger="lancet"):
        wait_for_capacity(8, 0.5, 0.0, autoscale=True, timeout_s=60)
    assert "waiting for the autoscaler" in caplog.text and "needs 8 workers" in caplog.text
    clock = iter(range(0, 1000, 30))
    monkeypatch.setattr(capacity.time, "monotonic", lambda: next(clock))
    with pytest.raises(CapacityError, match=r"after waiting \d+ s for the autoscaler"):
        wait_for_capacity(64, 0.5, 0.0, autoscale=True, timeout_s=60)
