"""One loader of the `keras-sequence` workload (keras_fit.py), in a fresh interpreter:

    KERAS_BACKEND=jax python -m shmfeed._cli.bench.keras_fit_child LOADER DATA_DIR WORKERS RESULT.json

(keras_fit.py starts it with `_interpreter.python_command`, so that it imports the same
shmfeed and its classes pickle by reference, not as `__main__`'s.)

Owns the tutorial's `DataGenerator` as its users write it (module level, so that it
pickles for Keras's and shmfeed's workers) and the timed `model.fit`.  JAX's backend is
started (the train step compiled on a batch of zeros) before the loader is made.
"""

from __future__ import annotations

import json
import random
import sys
import time
import traceback
from pathlib import Path

import keras
import numpy as np

import shmfeed

from .keras_fit import BATCH_SIZE, DIM, EPOCHS, IO_S, N_CHANNELS, N_CLASSES


class DataGenerator(keras.utils.Sequence):
    """The tutorial's generator (stanford.edu/~shervine/blog/keras-how-to-generate-data-on-the-fly),
    with `data_dir` for its `data/` folder."""

    def __init__(self, list_IDs, labels, data_dir, batch_size=BATCH_SIZE, dim=DIM,
                 n_channels=N_CHANNELS, n_classes=N_CLASSES, shuffle=True, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.batch_size = batch_size
        self.labels = labels
        self.list_IDs = list_IDs
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.shuffle = shuffle
        self.data_dir = str(data_dir)
        self.on_epoch_end()

    def __len__(self):
        return int(np.floor(len(self.list_IDs) / self.batch_size))

    def __getitem__(self, index):
        indexes = self.indexes[index * self.batch_size:(index + 1) * self.batch_size]
        list_IDs_temp = [self.list_IDs[k] for k in indexes]
        X, y = self.__data_generation(list_IDs_temp)
        return X, y

    def on_epoch_end(self):
        self.indexes = np.arange(len(self.list_IDs))
        if self.shuffle:
            np.random.shuffle(self.indexes)

    def __data_generation(self, list_IDs_temp):
        X = np.empty((self.batch_size, *self.dim, self.n_channels))
        y = np.empty((self.batch_size), dtype=int)
        for i, ID in enumerate(list_IDs_temp):
            t = time.perf_counter()
            X[i,] = np.load(f"{self.data_dir}/{ID}.npy")
            # The page cache answers in ~0.1 ms: the rest of IO_S stands for the disk or
            # network storage the tutorial reads from (a wait, not CPU work).
            left = IO_S - (time.perf_counter() - t)
            if left > 0:
                time.sleep(left)
            y[i] = self.labels[ID]
        return X, keras.utils.to_categorical(y, num_classes=self.n_classes)


class StepTimes(keras.callbacks.Callback):
    """(begin, end) of every training step, per epoch."""

    def __init__(self):
        super().__init__()
        self.epochs: list[list[tuple[float, float]]] = []
        self._begin = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append([])

    def on_train_batch_begin(self, batch, logs=None):
        self._begin = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.epochs[-1].append((self._begin, time.perf_counter()))


def measure(loader: str, data_dir: Path, workers: int) -> dict:
    labels = json.loads((data_dir / "labels.json").read_text())
    ids = sorted(labels, key=lambda s: int(s.split("-")[1]))
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(DIM + (N_CHANNELS,)), keras.layers.Flatten(),
                              keras.layers.Dense(N_CLASSES, activation="softmax")])
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    # Starts JAX's backend and compiles the step, outside the timed part.
    model.train_on_batch(np.zeros((BATCH_SIZE, *DIM, N_CHANNELS)), np.zeros((BATCH_SIZE, N_CLASSES)))
    np.random.seed(0)
    random.seed(0)
    times = StepTimes()
    t0 = time.perf_counter()
    if loader == "keras":
        x = DataGenerator(ids, labels, data_dir, workers=workers, use_multiprocessing=True)
    else:
        x = DataGenerator(ids, labels, data_dir)
    if loader == "shmfeed":
        x = shmfeed.keras.feed(x, num_workers=workers)
    model.fit(x, epochs=EPOCHS, verbose=0, callbacks=[times])
    fit_s = time.perf_counter() - t0
    if loader == "shmfeed":
        x.close()
    first_step_end = times.epochs[0][0][1]
    return {"status": "ok", "fit_s": fit_s, "startup_s": first_step_end - t0,
            "after_first_step_s": t0 + fit_s - first_step_end, "steps": times.epochs}


def main(argv: list[str]) -> int:
    loader, data_dir, workers, out = argv
    if loader == "shmfeed":
        # Where a script imports it, at its top, before JAX starts: pools then start from
        # a copy of this process taken there (the fork server), with keras imported.
        import shmfeed.keras  # noqa: F401
    try:
        result = measure(loader, Path(data_dir), int(workers))
    except BaseException as exc:  # noqa: B036 - any failure is a result to report
        result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()}
    Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
