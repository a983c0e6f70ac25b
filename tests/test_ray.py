"""shmfeed.ray: batches built by Ray actors are the local workers' batches, exactly once,
in order, under actor deaths and stalls, resumable with another number of actors.

A real Ray cluster on localhost: one `ray.init(num_cpus=2)` for this module, in the
integration tier (starting it alone takes 3 to 16 s on the loaded 2-core development
machine, the module ~45 s; the default tier runs only the refusals that need no
cluster), and, also in the integration tier, a 3-node `ray.cluster_utils.Cluster` from
which a node is removed and actors are killed (tests/test_ray_cluster.py).  Every
fixture shuts Ray down in a finalizer and checks that none of its processes is left."""

from __future__ import annotations

import os
import subprocess
import sys

import _raysources
import numpy as np
import pytest
from _raysources import Locked, Noisy, Ragged, mixup, ragged_length
from _raytools import (  # noqa: F401
    OPTS,
    RAY_INIT,
    children_now,
    copy,
    no_leaks,
    ray_children_gone,
    reference,
    same,
    take,
)

import shmfeed

# Ray is imported when this module's first test runs, which is after the fork tests
# (tests/_lazy.py).
IMPORTS_BIG = True
ray = Builders = RayClusterError = None


@pytest.fixture(scope="module", autouse=True)
def ray_imported():
    global ray, Builders, RayClusterError
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    from shmfeed.ray import Builders, RayClusterError
    # The actors do not have tests/ on their path: the sources travel by value.
    cloudpickle.register_pickle_by_value(_raysources)


@pytest.fixture(scope="module")
def ray_local(request, ray_imported):
    before = children_now()
    ray.init(num_cpus=2, **RAY_INIT)
    request.addfinalizer(lambda: ray_children_gone(before))
    request.addfinalizer(ray.shutdown)
    return ray


@pytest.mark.integration
def test_ray_batches_differ_from_local_workers_for_no_actor_count_or_mix(ray_local):
    src = Noisy(42)
    want = reference(src, 2, **OPTS)
    for num_workers, builders in ((0, Builders(num_actors=2)), (1, Builders(num_actors=1, window=2))):
        with shmfeed.Loader(src, num_workers=num_workers, builders=builders, **OPTS) as loader:
            assert same(take(loader, 2), want)
            stats = builders.stats()
        assert stats["batches"] + sum(w["batches"] for w in loader.stats().workers[:num_workers]) == 2 * 11
        assert stats["in_flight_max"] <= builders.window
        assert stats["object_store_bytes_max"] <= stats["object_store_bytes_cap"] == builders.window * loader.slot_bytes


@pytest.mark.integration
def test_ray_gathered_array_batches_differ_from_the_c_loop_of_local_workers(ray_local):
    data = {"x": np.arange(70 * 6, dtype=np.float32).reshape(70, 6), "y": np.arange(70, dtype=np.int16)}
    want = reference(data, 2, **OPTS)
    with shmfeed.Loader(data, num_workers=1, builders=Builders(1), **OPTS) as loader:
        assert same(take(loader, 2), want)


@pytest.mark.integration
@pytest.mark.parametrize("layout", ["buckets", "token_budget"])
def test_ray_padded_buckets_laid_out_like_a_local_slot(ray_local, layout):
    kw = dict(shuffle=True, seed=1, padded_shapes={"tokens": (None,)}, bucket_boundaries=[3, 8],
              bucket_lengths=ragged_length, with_lengths=True)
    kw.update(batch_size=5) if layout == "buckets" else kw.update(batch_size=None, token_budget=24)
    want = reference(Ragged(40), 1, **kw)
    with shmfeed.Loader(Ragged(40), num_workers=0, builders=Builders(2), **kw) as loader:
        assert same(take(loader), want)


@pytest.mark.integration
def test_ray_batch_transform_runs_on_the_actor_with_the_batch_keyed_rng(ray_local):
    kw = dict(batch_size=4, shuffle=True, seed=2, batch_transform=mixup)
    want = reference(Noisy(30), 2, **kw)
    with shmfeed.Loader(Noisy(30), num_workers=1, builders=Builders(1), **kw) as loader:
        assert same(take(loader, 2), want)


@pytest.mark.integration
def test_actor_that_dies_mid_batch_is_replaced_and_batch_rebuilt_once(ray_local, tmp_path):
    src = Noisy(40, fault="die", at=13, marker=str(tmp_path / "died"))
    want = reference(Noisy(40), 2, **OPTS)
    builders = Builders(num_actors=2)
    with shmfeed.Loader(src, num_workers=0, builders=builders, **OPTS) as loader:
        assert same(take(loader, 2), want)
    # The batch that killed its actor, and at most one more that was queued on it (a
    # window of 4 over 2 actors), each asked once more; each copied into the ring once.
    stats = builders.stats()
    assert (stats["actors_replaced"], stats["batches"]) == (1, 20) and 1 <= stats["rebuilt"] <= 2
    assert stats["requests"] == stats["batches"] + stats["rebuilt"]


@pytest.mark.integration
def test_stalled_actor_times_out_and_its_batch_is_built_elsewhere(ray_local, tmp_path):
    src = Noisy(24, fault="stall", at=5, marker=str(tmp_path / "stalled"))
    want = reference(Noisy(24), 1, **OPTS)
    builders = Builders(num_actors=2, timeout_s=1.5)
    with shmfeed.Loader(src, num_workers=0, builders=builders, timeout_s=30, **OPTS) as loader:
        assert same(take(loader), want)
    stats = builders.stats()
    # A request queued behind the stalled one on the same actor stalls with it.
    assert stats["actors_replaced"] == 1 and stats["batches"] == 6 and 1 <= stats["stalls"] <= 2
    assert 1 <= stats["rebuilt"] <= 2 and stats["requests"] == stats["batches"] + stats["rebuilt"]


@pytest.mark.integration
def test_source_error_on_an_actor_is_raised_in_batch_order_as_its_type(ray_local, tmp_path):
    src = Noisy(24, fault="raise", at=9, marker=str(tmp_path / "raised"))
    want = reference(Noisy(24), 1, batch_size=4, seed=7)
    got = []
    with shmfeed.Loader(src, num_workers=0, builders=Builders(2), batch_size=4, seed=7) as loader:
        with pytest.raises(KeyError, match="sample 9 is broken") as info:
            for batch in loader:
                got.append(copy(batch))
        assert isinstance(info.value, shmfeed.WorkerError) and info.value.batch == 2
        assert same([got], [want[0][:2]])
        assert same(take(loader), reference(Noisy(24), 2, batch_size=4, seed=7)[1:])


@pytest.mark.integration
def test_state_dict_resumes_with_another_number_of_actors(ray_local):
    src = Noisy(44)
    want = reference(src, 2, **OPTS)
    with shmfeed.Loader(src, num_workers=0, builders=Builders(2), **OPTS) as loader:
        first = take(loader, 1) + take(loader, 1, stop_after=4)
        state = loader.state_dict()
        with pytest.raises(shmfeed.SpecError, match="create a new Loader"):
            loader.source_changed()  # the actors' copies would go stale
    with shmfeed.Loader(src, num_workers=1, builders=Builders(1, window=1), **OPTS) as loader:
        loader.load_state_dict(state)
        rest = take(loader, 1)
    assert same([first[0], first[1] + rest[0]], want)


@pytest.mark.integration
def test_unshippable_source_is_refused_at_construction_naming_the_attribute(ray_local):
    with pytest.raises(shmfeed.SourcePickleError, match=r"`source.guard\['lock'\]`.*cannot be pickled") as info:
        shmfeed.Loader(Locked(8), batch_size=2, num_workers=0, builders=Builders(1))
    assert "Ray actors" in str(info.value)


@pytest.mark.integration
def test_cluster_without_free_cpus_is_refused_at_construction(ray_local):
    with pytest.raises(RayClusterError, match=r"2 CPUs.*`num_actors=3`.*need 3\. Lower `num_actors`"):
        shmfeed.Loader(Noisy(8), batch_size=2, num_workers=0, builders=Builders(3))


def test_stream_and_hooked_sources_are_refused_before_any_cluster_is_needed():
    def gen():
        yield from ({"x": np.zeros(2)} for _ in range(100))

    with pytest.raises(shmfeed.SpecError, match="stream read in order"):
        shmfeed.Loader(gen, batch_size=2, num_workers=0, steps_per_epoch=3, builders=Builders(1))

    class Hooked(Noisy):
        def on_epoch_end(self):
            pass

    with pytest.raises(shmfeed.SpecError, match="epoch hooks"):
        shmfeed.Loader(Hooked(8), batch_size=2, num_workers=0, builders=Builders(1))
    with pytest.raises(shmfeed.SpecError, match="must be a `shmfeed.ray.Builders`, got int"):
        shmfeed.Loader(Noisy(8), batch_size=2, num_workers=0, builders=4)
    with pytest.raises(shmfeed.SpecError, match="`window` must be an integer >= 1, got 0"):
        Builders(2, window=0)


NO_CLUSTER = """
import os, numpy as np, shmfeed
from shmfeed.ray import Builders, RayClusterError
try:
    shmfeed.Loader(np.zeros((8, 2)), batch_size=2, num_workers=0, builders=Builders(1, address=os.environ["ADDR"]))
except RayClusterError as exc:
    print("REFUSED", exc)
"""


@pytest.mark.integration
def test_unreachable_cluster_is_refused_at_construction():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["ADDR"] = "127.0.0.1:9"
    out = subprocess.run([sys.executable, "-c", NO_CLUSTER], env=env, capture_output=True, text=True,
                         timeout=110)
    assert "REFUSED no Ray cluster is reachable at 127.0.0.1:9" in out.stdout, out.stderr[-2000:]
