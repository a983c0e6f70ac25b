"""shmfeed.keras resumes mid-epoch: a Feed's position is the last batch the model
trained on (`on_train_batch_end`), Keras's build step consumes nothing, a Loader resumed
by hand continues exactly, and `shmfeed.keras.BackupAndRestore` brings a fit killed with
SIGKILL back at the exact batch, with the weights of an uninterrupted run.

These tests start JAX's backend, so they run last (conftest.py) with test_keras.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _sources import Labelled
from test_keras import import_keras

import shmfeed

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy")
BATCHES = 40
BS = 4
N = BATCHES * BS
ROOT = Path(__file__).resolve().parent.parent
keras = StopAt = None  # imported when this module's first test runs (test_keras.import_keras)


@pytest.fixture(scope="module", autouse=True)
def keras_imported():
    global keras, StopAt
    import_keras()
    import keras

    class StopAt(keras.callbacks.Callback):
        def __init__(self, batch: int):
            super().__init__()
            self.batch = batch

        def on_train_batch_end(self, batch, logs=None):
            if batch == self.batch:
                self.model.stop_training = True


def model(steps_per_execution: int = 1) -> keras.Model:
    keras.utils.set_random_seed(1)
    m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                          keras.layers.Dense(5, activation="softmax")])
    m.compile(optimizer=keras.optimizers.SGD(0.05), loss="categorical_crossentropy",
              steps_per_execution=steps_per_execution)
    return m


def loader() -> shmfeed.Loader:
    return shmfeed.Loader(Labelled(N), batch_size=BS, num_workers=1, shuffle=True, seed=3)


def assert_same_weights(a: keras.Model, b: keras.Model) -> None:
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-7)


@pytest.fixture(scope="module")
def uninterrupted():
    """One epoch of the 40 batches, in one fit."""
    m = model()
    with loader() as L:
        m.fit(shmfeed.keras.feed(L), epochs=1, shuffle=False, verbose=0)
    return m


@pytest.mark.parametrize("rebuilt", [True, False], ids=["model-rebuilt-with-load_weights",
                                                         "model-already-built"])
def test_a_loader_resumed_by_hand_trains_the_rest_of_its_epoch_exactly_once(uninterrupted, rebuilt, tmp_path):
    """Issue 23's first two scenarios: 15 of 40 batches, the loader's state saved, then a
    new Loader loaded with it.  Rebuilt: Keras's build step reads a batch it throws away
    (it used to be the resumed batch 15, and a new epoch then started: 25 batches never
    trained); built: the epoch used to end in an internal error at position 25."""
    m = model()
    with loader() as L1:
        m.fit(shmfeed.keras.feed(L1), epochs=1, shuffle=False, verbose=0, callbacks=[StopAt(14)])
        state = json.loads(json.dumps(L1.state_dict()))
        assert (state["epoch"], state["next_batch"]) == (0, 15)
        assert L1.stats().batches == 15
    if rebuilt:
        m.save_weights(tmp_path / "w.weights.h5")
        m = model()
        m.load_weights(tmp_path / "w.weights.h5")
    with loader() as L2:
        L2.load_state_dict(state)
        f = shmfeed.keras.feed(L2)
        history = m.fit(f, initial_epoch=0, epochs=1, shuffle=False, verbose=0)
        assert len(history.history["loss"]) == 1
        assert f.stats().batches == 25 and f.stats().epochs_started == 1
        after = L2.state_dict()
        assert (after["epoch"], after["next_batch"]) == (0, 40)
    assert_same_weights(m, uninterrupted)


def test_the_state_inside_one_fit_names_keras_epoch_and_the_batch_trained():
    """Issue 23's third scenario: the build step started a loader epoch of its own, so the
    state's epoch was Keras's + 1; and stats counted the batch it threw away."""
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            s = L.state_dict()
            seen.append((s["epoch"], s["next_batch"]))

        def on_epoch_begin(self, epoch, logs=None):
            seen.append(("epoch", epoch))

    m = model()
    with shmfeed.Loader(Labelled(40), batch_size=BS, num_workers=1) as L:
        f = shmfeed.keras.feed(L)
        m.fit(f, epochs=3, shuffle=False, verbose=0, callbacks=[Record()])
        stats = f.stats()
    want = []
    for e in range(3):
        want += [("epoch", e)] + [(e, b + 1) for b in range(10)]
    assert seen == want
    assert stats.batches == 30 and stats.epochs_started == 3
    assert L.stats().batches == 30  # after close


def test_a_feed_state_counts_only_what_was_trained_with_steps_per_execution(tmp_path):
    """With `steps_per_execution=4` Keras acknowledges 4 batches at a time, and the last
    execution of an epoch of 10 has only 2."""
    positions = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            positions.append((batch, f.state_dict()["position"], f.loader.state_dict()["next_batch"]))

    m = model(steps_per_execution=4)
    with shmfeed.keras.feed(Labelled(40), batch_size=BS, num_workers=1) as f:
        m.fit(f, epochs=2, shuffle=False, verbose=0,
              callbacks=[shmfeed.keras.BackupAndRestore(str(tmp_path / "b"), save_freq=4), Record()])
        assert f.stats().batches == 20
    assert positions == [(3, 4, 4), (7, 8, 8), (11, 10, 10)] * 2


def test_a_feed_state_is_refused_where_it_cannot_continue_exactly():
    with shmfeed.keras.feed(Labelled(40), batch_size=BS, num_workers=0) as f:
        with pytest.raises(shmfeed.SpecError, match="Feed.state_dict"):
            f.load_state_dict(f.loader.state_dict())
        state = f.state_dict()
        f.on_epoch_begin()
        f[0]
        with pytest.raises(shmfeed.ShmfeedError, match="position 1 of a pass"):
            f.load_state_dict(state)
    with shmfeed.keras.feed(Labelled(44), batch_size=BS, num_workers=0) as other:
        with pytest.raises(shmfeed.SpecError, match="saved for 10 batches"):
            other.load_state_dict(state)


KILLED_FIT = """
import json, os, signal, sys
import numpy as np
import keras
import shmfeed.keras
from _sources import DataGenerator, Labelled

BS = 4
backup, kind, out, data = sys.argv[1:5]

class Tutorial(DataGenerator, keras.utils.Sequence):
    def __init__(self):
        keras.utils.Sequence.__init__(self)
        DataGenerator.__init__(self, list(range(48)), {i: i % 5 for i in range(48)}, batch_size=BS)

def model():
    keras.utils.set_random_seed(1)  # seeds random and np.random too
    shape = (6,) if data == "loader" else (2, 3)
    m = keras.Sequential([keras.Input(shape), keras.layers.Flatten(),
                          keras.layers.Dense(8, activation="tanh"),
                          keras.layers.Dense(5, activation="softmax")])
    m.compile(optimizer=keras.optimizers.SGD(0.05), loss="categorical_crossentropy")
    return m

class KillAt(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if kind == "kill" and (self.epoch, batch) == (1, 7):
            os.kill(os.getpid(), signal.SIGKILL)
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

m = model()
if data == "loader":  # the Loader's order (its own shuffle)
    f, shuffle = shmfeed.keras.feed(Labelled(48), batch_size=BS, num_workers=1, shuffle=True, seed=5), False
else:  # a Sequence in Keras's order (fit's shuffle), reshuffling with np.random at each epoch's end
    f, shuffle = shmfeed.keras.feed(Tutorial(), num_workers=1), True
with f:
    m.fit(f, epochs=3, shuffle=shuffle, verbose=0,
          callbacks=[shmfeed.keras.BackupAndRestore(backup, save_freq=3), KillAt()])
    trained = f.stats().batches
json.dump({"weights": [w.tolist() for w in m.get_weights()], "trained": trained}, open(out, "w"))
"""


def start_fit(tmp_path: Path, backup: Path, kind: str, data: str) -> subprocess.Popen:
    out = tmp_path / f"{kind}.json"
    return subprocess.Popen(
        [sys.executable, "-c", KILLED_FIT, str(backup), kind, str(out), data], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", KERAS_BACKEND="jax"))


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait(10)
    return proc.returncode, err


# Each run is a fresh interpreter starting JAX (seconds): the default tier kills the
# tutorial's Sequence, the `integration` tier the Loader's order too.
@pytest.mark.parametrize("data", [pytest.param("loader", marks=pytest.mark.integration), "sequence"])
def test_a_fit_killed_mid_epoch_resumes_at_the_exact_batch_through_backup_and_restore(tmp_path, data):
    """12 batches an epoch, a checkpoint every 3 (the one due at an epoch's last batch is
    taken at its end), SIGKILL at epoch 1's batch 7: the second run starts after batch 5
    and trains 6 + 12 batches; the weights equal an uninterrupted run's.  For a Sequence
    in fit's shuffled order that also takes the pass's order, the Sequence's state and
    the RNGs its hooks and Keras's shuffle draw from."""
    backup = tmp_path / "backup"
    full = start_fit(tmp_path, tmp_path / "other", "full", data)  # beside the others: 2 CPUs
    try:
        code, err = finish(start_fit(tmp_path, backup, "kill", data))
        assert code == -signal.SIGKILL, err
        metadata = json.loads((backup / "training_metadata.json").read_text())
        assert (metadata["epoch"], metadata["batch"]) == (1, 5)
        assert metadata["shmfeed"]["position"] == 6 and not metadata["shmfeed"]["between_epochs"]
        code, err = finish(start_fit(tmp_path, backup, "resume", data))
        assert code == 0, err
        assert "ran out of data" not in err
        assert not backup.exists()  # Keras's delete_checkpoint, once fit completed
    finally:
        code, err = finish(full)
    assert code == 0, err
    got, want = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("resume", "full"))
    assert got["trained"] == 6 + 12 and want["trained"] == 36
    for a, b in zip(got["weights"], want["weights"]):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=1e-7)


def test_batches_read_ahead_are_not_the_position_until_the_model_acknowledges_them(tmp_path):
    """On a GPU, Keras's JAX trainer reads one batch ahead of the step; the position and
    stats follow `on_train_batch_end`, not the reads."""
    with shmfeed.keras.feed(Labelled(40), batch_size=BS, num_workers=1) as f:
        shmfeed.keras.BackupAndRestore(str(tmp_path / "b")).on_epoch_begin(0)
        f.on_epoch_begin()  # as in fit: the callback's epoch starts first, then the data's
        f[0], f[1], f[2]  # the step on batch 0 runs while 1 and 2 are read
        assert f.state_dict()["position"] == 0 and f.loader.state_dict()["next_batch"] == 0
        f._acknowledge(0)
        assert f.state_dict()["position"] == 1 and f.loader.state_dict()["next_batch"] == 1
        assert f.stats().batches == 1 and f.loader.stats().batches == 1


def test_a_sequence_feeds_stats_count_keras_epochs_and_trained_batches_only():
    """'169 batches over 4 epochs' for a 3-epoch fit: the build step's batch and pass."""
    from test_keras import Tutorial, small_model

    m = small_model()
    with shmfeed.keras.feed(Tutorial(), num_workers=1) as f:
        m.fit(f, epochs=3, verbose=0)
    s = f.stats()
    assert (s.batches, s.epochs_started) == (3 * len(f), 3)
    assert f"{3 * len(f)} batches" in str(s) and "over 3 epoch(s)" in str(s)


def test_a_checkpoint_of_a_feed_is_refused_for_other_training_data(tmp_path):
    backup = str(tmp_path / "b")
    m = model()
    with shmfeed.keras.feed(Labelled(40), batch_size=BS, num_workers=0) as f:
        m.fit(f, epochs=1, shuffle=False, verbose=0,
              callbacks=[shmfeed.keras.BackupAndRestore(backup, save_freq=3, delete_checkpoint=False)])
    x = np.stack([Labelled(40)[i][0] for i in range(40)])
    y = np.stack([Labelled(40)[i][1] for i in range(40)])
    with pytest.raises(shmfeed.ShmfeedError, match="holds the position of a shmfeed Feed"):
        m.fit(x, y, epochs=2, verbose=0, callbacks=[shmfeed.keras.BackupAndRestore(backup, save_freq=3)])
