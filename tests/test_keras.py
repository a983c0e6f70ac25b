"""shmfeed.keras with Keras 3 on the JAX backend: `model.fit` fed by shmfeed trains on the
same batches, in the same order, with the same hooks and the same RNG streams as Keras's
own in-process loading of the same Sequence, so the final weights are equal.

These tests start JAX's backend, so they run last (conftest.py) and every pool starts in
a fresh interpreter: the case shmfeed.keras is for.
"""

from __future__ import annotations

import os
import random

import conftest
import numpy as np
import pytest
from _sources import DataGenerator, Labelled

import shmfeed

# Keras 3.15's Variable.__array__ predates numpy 2's `copy` keyword (its get_weights warns).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy")
N_IDS = 24
N_CLASSES = 5
LABELS = {i: i % N_CLASSES for i in range(N_IDS)}


class TutorialBody(DataGenerator):
    """The tutorial generator as users write it: a keras.utils.Sequence whose
    on_epoch_end reshuffles with np.random.  Records where and when its hooks ran.
    `Tutorial` is this on keras.utils.Sequence, made once keras is imported."""

    def __init__(self, n_ids: int = N_IDS, **kw):
        keras.utils.Sequence.__init__(self)
        self.hooks: list[tuple[str, int]] = []
        DataGenerator.__init__(self, list(range(n_ids)), LABELS, batch_size=4, n_classes=N_CLASSES, **kw)
        self.hooks.clear()  # the constructor's own on_epoch_end is not Keras's

    def on_epoch_begin(self):
        self.hooks.append(("begin", os.getpid()))

    def on_epoch_end(self):
        if hasattr(self, "hooks"):
            self.hooks.append(("end", os.getpid()))
        super().on_epoch_end()


# keras (~300 MB with jax) is imported when this module's first test runs, not when
# pytest collects it: the fork tests run first, faster without it (tests/_lazy.py).
keras = None


def import_keras() -> None:
    global keras, Tutorial
    if keras is not None:
        return
    imported = pytest.importorskip("keras")
    if imported.backend.backend() != "jax":
        pytest.skip(f"needs Keras's JAX backend, not {imported.backend.backend()!r}")
    Tutorial = type("Tutorial", (TutorialBody, imported.utils.Sequence),
                    {"__module__": __name__, "__doc__": TutorialBody.__doc__})
    keras = imported
    # Last: it may start the fork server, a copy of this process from now on, whose pools
    # unpickle `test_keras.Tutorial`.
    import shmfeed.keras  # noqa: F401
    conftest.freeze_heap()


def __getattr__(name: str):  # `from test_keras import Tutorial`, or a pool unpickling one
    if name == "Tutorial":
        import_keras()
        return Tutorial
    raise AttributeError(name)


@pytest.fixture(scope="module", autouse=True)
def keras_imported():
    import_keras()


def small_model(shape: tuple = (2, 3)) -> keras.Model:
    keras.utils.set_random_seed(1)  # seeds random and np.random too: before the user's seeds
    model = keras.Sequential([keras.Input(shape), keras.layers.Flatten(),
                              keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(N_CLASSES, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="categorical_crossentropy")
    return model


def train(make_x, *, fit: dict | None = None, epochs: int = 3, validation: bool = False,
          n_ids: int = N_IDS):
    """Fit a fresh model on `make_x(Tutorial())` after seeding the user's RNGs; the
    weights, the history, the hooks seen and the next draws of np.random and random."""
    model = small_model()
    np.random.seed(123)
    random.seed(7)
    seq = Tutorial(n_ids)
    val = make_x(Tutorial(8, shuffle=False)) if validation else None
    x = make_x(seq)
    history = model.fit(x, epochs=epochs, verbose=0, validation_data=val, **(fit or {}))
    after = (np.random.random(), random.random())
    for f in (x, val):
        if isinstance(f, shmfeed.keras.Feed):
            f.close()
    return model.get_weights(), history.history, seq.hooks, after


def by_keras(seq):
    return seq


def by_shmfeed(seq):
    return shmfeed.keras.feed(seq, num_workers=2)


def assert_same_run(a, b):
    (wa, ha, hooks_a, after_a), (wb, hb, hooks_b, after_b) = a, b
    for x, y in zip(wa, wb):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-7)
    assert ha.keys() == hb.keys()
    for k in ha:
        np.testing.assert_allclose(ha[k], hb[k], rtol=1e-6)
    assert hooks_a == hooks_b
    assert after_a == after_b  # the user's RNG streams went on exactly as under Keras


@pytest.mark.contract
def test_fit_trains_every_epoch_on_the_same_batches_as_keras_in_process():
    keras_run = train(by_keras)
    shm_run = train(by_shmfeed)
    assert_same_run(keras_run, shm_run)
    assert [h for h, _ in shm_run[2]] == ["begin", "end"] * 4  # model build + 3 epochs
    assert {pid for _, pid in shm_run[2]} == {os.getpid()}
    assert len(shm_run[1]["loss"]) == 3


@pytest.mark.contract
def test_fit_without_keras_shuffle_and_with_validation_data():
    assert_same_run(train(by_keras, fit={"shuffle": False}, validation=True),
                    train(by_shmfeed, fit={"shuffle": False}, validation=True))


@pytest.mark.contract
def test_steps_per_epoch_continues_the_pass_across_epochs_and_initial_epoch():
    fit = {"steps_per_epoch": 3, "initial_epoch": 1}  # 6 batches a pass: cut by a hook
    assert_same_run(train(by_keras, fit=fit, epochs=5), train(by_shmfeed, fit=fit, epochs=5))


@pytest.mark.contract
def test_evaluate_and_predict_match_keras():
    model = small_model()
    np.random.seed(5)
    seq = Tutorial(shuffle=False)
    want_loss = model.evaluate(seq, verbose=0)
    want_pred = model.predict(seq, verbose=0)
    with shmfeed.keras.feed(seq, num_workers=2) as f:
        assert model.evaluate(f, verbose=0) == pytest.approx(want_loss, rel=1e-6)
        np.testing.assert_allclose(model.predict(f, verbose=0), want_pred, rtol=1e-6)


@pytest.mark.contract
def test_a_per_sample_source_and_a_loader_train_like_arrays():
    n, bs = 20, 4
    x = np.stack([Labelled(n)[i][0] for i in range(n)])
    y = np.stack([Labelled(n)[i][1] for i in range(n)])
    want = small_model((6,))
    want.fit(x, y, batch_size=bs, epochs=2, shuffle=False, verbose=0)

    got = small_model((6,))
    with shmfeed.keras.feed(Labelled(n), batch_size=bs, num_workers=2) as f:
        got.fit(f, epochs=2, shuffle=False, verbose=0)
    with shmfeed.Loader(Labelled(n), batch_size=bs, num_workers=1) as loader:
        via_loader = small_model((6,))
        with pytest.warns(UserWarning, match="feed's order is its Loader's"):
            via_loader.fit(shmfeed.keras.feed(loader), epochs=2, verbose=0)  # fit shuffles by default
        assert len(list(loader)) == n // bs  # feed() left the Loader open
    for a, b, c in zip(want.get_weights(), got.get_weights(), via_loader.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
        np.testing.assert_allclose(a, c, rtol=0, atol=1e-7)


def test_batches_are_copies_unless_copy_false():
    seq = Tutorial(shuffle=False)
    with shmfeed.keras.feed(seq, num_workers=0) as f:
        f.on_epoch_begin()
        x, _ = f[0]
        assert not np.may_share_memory(x, f.loader._ring_data())
        np.testing.assert_array_equal(x, seq[0][0])
    with shmfeed.keras.feed(seq, num_workers=0, copy=False) as f:
        f.on_epoch_begin()
        x, _ = f[0]
        assert np.may_share_memory(x, f.loader._ring_data())
        del x


@pytest.mark.contract
def test_an_index_out_of_order_is_an_error_not_another_batch():
    with shmfeed.keras.feed(Tutorial(shuffle=False), num_workers=0) as f:
        f.on_epoch_begin()
        f[0]
        with pytest.raises(shmfeed.ShmfeedError, match=r"asked for batch 3 where shmfeed expected batch 1"):
            f[3]


def test_keras_workers_cannot_be_turned_on_and_options_are_checked():
    with shmfeed.keras.feed(Tutorial(), num_workers=0) as f:
        assert f.workers == 0 and not f.use_multiprocessing
        with pytest.raises(shmfeed.SpecError, match="`num_workers`"):
            f.workers = 4
    with pytest.raises(shmfeed.SpecError, match="needs `num_workers`"):
        shmfeed.keras.feed(Tutorial())
    with pytest.raises(shmfeed.SpecError, match="drop `shuffle`"):
        shmfeed.keras.feed(Tutorial(), num_workers=0, shuffle=True)
    with shmfeed.Loader(Labelled(8), batch_size=4, num_workers=0) as loader:
        with pytest.raises(shmfeed.SpecError, match="belong to its constructor"):
            shmfeed.keras.feed(loader, num_workers=2)


@pytest.mark.integration
def test_the_keras_example_trains_and_runs_its_body_once(tmp_path):
    """examples/train_keras.py: the tutorial's script with no __main__ guard, JAX
    running before the feeds exist (so their pools start from the fork server)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "examples" / "train_keras.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=100,
                         env=dict(os.environ, PYTHONPATH=str(root), KERAS_BACKEND="jax"))
    assert out.returncode == 0, out.stdout + out.stderr
    accuracy = float(out.stdout.rsplit("validation accuracy", 1)[1])
    assert accuracy >= 0.9, out.stdout
    assert out.stdout.count("validation accuracy") == 1  # the script's body ran once


TORCH_BACKEND_SCRIPT = """
import json, numpy as np, keras, shmfeed.keras

class Seq(keras.utils.PyDataset):
    def __init__(self):
        super().__init__()
        self.x = np.random.default_rng(0).random((64, 4), np.float32)
    def __len__(self):
        return 8
    def __getitem__(self, i):
        return self.x[i * 8:(i + 1) * 8], self.x[i * 8:(i + 1) * 8, :1] * 3

def train(x):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.fit(x, epochs=3, verbose=0)
    return [w.tolist() for w in model.get_weights()]

with shmfeed.keras.feed(Seq(), num_workers=2) as feed:
    fed = train(feed)
print(json.dumps({"backend": keras.backend.backend(), "same": fed == train(Seq())}))
"""


def test_the_torch_backend_trains_on_the_same_batches():
    """Keras's torch backend takes the same Feed (skipped where torch is not installed:
    it is not one of shmfeed's dependencies)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("torch")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", TORCH_BACKEND_SCRIPT], capture_output=True, text=True,
                         timeout=100, env=dict(os.environ, PYTHONPATH=str(root), KERAS_BACKEND="torch"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"backend": "torch", "same": True}


def test_fits_logs_say_how_input_bound_each_epoch_was():
    class SlowTutorial(Tutorial):
        def __getitem__(self, index):
            import time

            time.sleep(0.02)  # far slower than the tiny model's step: the fit waits for input
            return super().__getitem__(index)

    model = small_model()
    with shmfeed.keras.feed(SlowTutorial(), num_workers=1) as train:
        history = model.fit(train, epochs=3, verbose=0, callbacks=[shmfeed.keras.InputWait(train)])
    waits = history.history["input_wait"]
    # The first epoch also compiles the step (seconds): only the later ones wait on input.
    assert len(waits) == 3 and all(0 <= w <= 1 for w in waits) and min(waits[1:]) > 0.5, waits
    assert all(r > 0 for r in history.history["input_batches_per_s"])
    with pytest.raises(shmfeed.SpecError, match="InputWait needs the shmfeed Feed"):
        shmfeed.keras.InputWait(SlowTutorial())
