"""The installed shmfeed (a wheel in a fresh venv, not the checkout) imports and feeds
two epochs from forked workers, in order.  .ci/run runs it from outside the checkout."""

import pathlib
import sys

import numpy as np

import shmfeed


class Squares:
    def __len__(self):
        return 1000

    def __getitem__(self, i):
        return {"x": np.full(64, i * i, dtype=np.int64), "y": np.int32(i)}


def main() -> None:
    here = pathlib.Path(shmfeed.__file__).resolve()
    if "site-packages" not in here.parts:
        sys.exit(f"smoke: imported shmfeed from {here}, not from the installed wheel")
    with shmfeed.Loader(Squares(), batch_size=50, num_workers=2, shuffle=True, seed=3) as loader:
        for epoch in range(2):
            seen = []
            for batch in loader:
                ys = batch["y"].astype(np.int64)
                assert (batch["x"][:, 0] == ys * ys).all(), "a row holds another sample's data"
                seen.extend(ys.tolist())
            assert sorted(seen) == list(range(1000)), f"epoch {epoch}: not each sample once"
    print(f"smoke: shmfeed {shmfeed.__version__} from {here.parent}: 2 epochs x 20 batches, "
          "2 workers, each sample once")


if __name__ == "__main__":
    main()
