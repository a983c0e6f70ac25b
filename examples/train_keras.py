"""Keras 3 `model.fit` from the tutorial's `DataGenerator`, with shmfeed's workers.

Written the way the tutorial writes it: one `.npy` per ID, a Sequence that reshuffles in
`on_epoch_end`, a script with no `if __name__ == "__main__":` guard.  The one change for
shmfeed is `shmfeed.keras.feed(...)` around the generators, in place of Keras 2's
`fit_generator(workers=..., use_multiprocessing=True)` (Keras 3: `PyDataset(workers=...)`).

    python examples/train_keras.py [DATA_DIR]
"""

import os
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")
import keras  # noqa: E402
import numpy as np  # noqa: E402

import shmfeed.keras  # noqa: E402


class DataGenerator(keras.utils.Sequence):
    def __init__(self, list_IDs, labels, data_dir, batch_size=32, dim=(16, 16, 16), n_channels=1,
                 n_classes=2, shuffle=True):
        super().__init__()
        self.dim, self.batch_size, self.labels, self.list_IDs = dim, batch_size, labels, list_IDs
        self.n_channels, self.n_classes, self.shuffle, self.data_dir = n_channels, n_classes, shuffle, data_dir
        self.on_epoch_end()

    def __len__(self):
        return int(np.floor(len(self.list_IDs) / self.batch_size))

    def __getitem__(self, index):
        indexes = self.indexes[index * self.batch_size:(index + 1) * self.batch_size]
        X = np.empty((self.batch_size, *self.dim, self.n_channels))
        y = np.empty((self.batch_size), dtype=int)
        for i, ID in enumerate(self.list_IDs[k] for k in indexes):
            X[i,] = np.load(os.path.join(self.data_dir, ID + ".npy"))
            y[i] = self.labels[ID]
        return X, keras.utils.to_categorical(y, num_classes=self.n_classes)

    def on_epoch_end(self):
        self.indexes = np.arange(len(self.list_IDs))
        if self.shuffle:
            np.random.shuffle(self.indexes)


# A learnable toy set: class 1 volumes are brighter on average.
data_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="shmfeed-keras-example-")
rng = np.random.default_rng(0)
labels = {f"id-{i}": i % 2 for i in range(640)}
for ID, label in labels.items():
    np.save(os.path.join(data_dir, ID + ".npy"), rng.random((16, 16, 16, 1), np.float32) + 0.3 * label)
partition = {"train": list(labels)[:512], "validation": list(labels)[512:]}

keras.utils.set_random_seed(0)  # the model's initial weights: a run is reproducible
model = keras.Sequential([keras.Input((16, 16, 16, 1)), keras.layers.GlobalAveragePooling3D(),
                          keras.layers.Dense(2, activation="softmax")])
model.compile(optimizer=keras.optimizers.Adam(0.05), loss="categorical_crossentropy", metrics=["accuracy"])

np.random.seed(0)  # controls the generators' reshuffles, exactly as without shmfeed
training_generator = shmfeed.keras.feed(DataGenerator(partition["train"], labels, data_dir), num_workers=2)
validation_generator = shmfeed.keras.feed(DataGenerator(partition["validation"], labels, data_dir),
                                          num_workers=1)
history = model.fit(training_generator, validation_data=validation_generator, epochs=4, verbose=2)
print(f"validation accuracy {history.history['val_accuracy'][-1]:.2f}")
