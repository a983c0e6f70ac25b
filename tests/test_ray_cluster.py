"""shmfeed.ray on a real 3-node Ray cluster on localhost (`ray.cluster_utils.Cluster`,
1 CPU and a small object store each): a node removed, actors killed at random and one
stalled while epochs run; every epoch bit-identical to the in-process reference, and a
resume with another number of actors (and a local worker) continues exactly."""

from __future__ import annotations

import random

import _raysources
import pytest
from _raysources import Noisy
from _raytools import (  # noqa: F401
    OBJECT_STORE_BYTES,
    OPTS,
    children_now,
    copy,
    no_leaks,
    ray_children_gone,
    reference,
    same,
    take,
)

import shmfeed

pytestmark = pytest.mark.integration
# Ray is imported when this module's first test runs, not when the default tier, which
# deselects it, collects it (tests/_lazy.py).
IMPORTS_BIG = True
ray = Builders = None


@pytest.fixture(scope="module", autouse=True)
def ray_imported():
    global ray, Builders
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    from shmfeed.ray import Builders
    cloudpickle.register_pickle_by_value(_raysources)  # the actors do not have tests/ on their path


@pytest.fixture(scope="module")
def cluster(request, ray_imported):
    """3 nodes of 1 CPU.  Module-scoped, i.e. set up before the per-test leak check:
    Ray's driver keeps files, event fds and sockets open even after `ray.shutdown()`;
    its processes are checked (ray_children_gone)."""
    from ray.cluster_utils import Cluster
    before = children_now()
    c = Cluster(initialize_head=True, connect=True,
                head_node_args=dict(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES,
                                    include_dashboard=False))
    request.addfinalizer(lambda: ray_children_gone(before))
    request.addfinalizer(c.shutdown)
    request.addfinalizer(ray.shutdown)
    nodes = [c.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES) for _ in range(2)]
    c.wait_for_nodes()
    return c, nodes


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_cluster_node_removed_actors_killed_and_stalled_every_epoch_exact(cluster, tmp_path):
    c, nodes = cluster
    epochs = 3
    want = reference(Noisy(60), epochs + 1, **OPTS)
    src = Noisy(60, fault="stall", at=31, marker=str(tmp_path / "stall"), delay_s=0.005)
    builders = Builders(num_actors=2, timeout_s=5.0, max_retries=6)
    rnd = random.Random(0)
    got = []
    with shmfeed.Loader(src, num_workers=0, builders=builders, timeout_s=120, **OPTS) as loader:
        for epoch in range(epochs):
            batches = []
            for b, batch in enumerate(loader):
                batches.append(copy(batch))
                if epoch == 0 and b == 3:
                    # A node hosting an actor (3 nodes, 2 actors: one is not the head).
                    hosts = set(ray.get([a.ready.remote() for a in builders.actors]))
                    c.remove_node(next(n for n in nodes if n.node_id in hosts))
                if epoch >= 1 and b in (2, 9):
                    ray.kill(rnd.choice(builders.actors))
            got.append(batches)
        state = loader.state_dict()
        stats = builders.stats()
    assert same(got, want[:epochs])
    # The node's actor, the stalled one and those killed (one may be hit twice) replaced;
    # every batch copied into the ring once.
    assert stats["batches"] == epochs * 15 and stats["stalls"] >= 1 and stats["actors_replaced"] >= 3
    assert stats["object_store_bytes_max"] <= stats["object_store_bytes_cap"]
    # Resume on the nodes left with one actor beside a local worker.
    with shmfeed.Loader(Noisy(60), num_workers=1, builders=Builders(1), **OPTS) as loader:
        loader.load_state_dict(state)
        assert same(take(loader), want[epochs:])
