import numpy as np

import shmfeed


class Counting:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": np.full((3,), i, np.int32), "y": i}


def test_two_workers_deliver_every_sample_once_in_order():
    with shmfeed.Loader(Counting(21), batch_size=4, num_workers=2) as loader:
        ys = np.concatenate([b["y"].copy() for b in loader])
    assert ys.tolist() == list(range(21))
