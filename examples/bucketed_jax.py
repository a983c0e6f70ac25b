"""Variable-length token sequences into a jitted JAX step: padding, masks from the true
lengths, and length bucketing (at most one compilation per bucket).

    python examples/bucketed_jax.py
    python examples/bucketed_jax.py --no-buckets     # everything padded to 512

The dataset is synthetic: sequence i has a long-tailed length in 1..512 (most are short)
and a label, the parity of its token sum.  The model is a masked mean of token
embeddings followed by a linear layer, trained with plain SGD.
"""

from __future__ import annotations

import argparse
import time

import jax  # importing starts nothing: the loader below still forks its workers
import jax.numpy as jnp
import numpy as np

import shmfeed
import shmfeed.jax

MAX_LEN = 512
VOCAB = 1000


def seq_length(i: int) -> int:
    """A long-tailed length in 1..MAX_LEN, a pure function of the index."""
    u = (i * 2654435761 % 2**32) / 2**32
    return 1 + int((MAX_LEN - 1) * u**4)


class Sequences:
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        tokens = shmfeed.rng().integers(1, VOCAB, size=seq_length(i), dtype=np.int32)
        return {"tokens": tokens, "label": np.int32(tokens.sum() % 2)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-buckets", action="store_true")
    args = p.parse_args()

    source = Sequences(args.samples)
    if args.no_buckets:
        bucketing = dict(padded_shapes={"tokens": (MAX_LEN,)})
    else:
        bucketing = dict(padded_shapes={"tokens": (None,)}, bucket_boundaries=[64, 128, 256, MAX_LEN],
                         bucket_lengths=seq_length)  # a function of the index, called once per sample
    # Created before JAX runs anything: the workers are forked.
    loader = shmfeed.Loader(source, batch_size=args.batch_size, num_workers=args.workers, shuffle=True,
                            drop_last=True, with_lengths=True, **bucketing)

    def loss_fn(params, batch):
        tokens, n = batch["tokens"], batch["lengths"]["tokens"]
        mask = jnp.arange(tokens.shape[1])[None, :] < n[:, None]  # (B, L): True on real tokens
        emb = params["embed"][tokens] * mask[..., None]
        pooled = emb.sum(1) / n[:, None]
        logits = pooled @ params["out"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(n)), batch["label"]])

    @jax.jit
    def step(params, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), loss

    key = jax.random.PRNGKey(0)
    params = {"embed": 0.1 * jax.random.normal(key, (VOCAB, 16)), "out": jnp.zeros((16, 2))}
    with loader:
        for epoch in range(2):
            t0, tokens, padded = time.perf_counter(), 0, 0
            for batch in shmfeed.jax.prefetch_to_device(loader):
                params, loss = step(params, batch)
                tokens += int(batch["lengths"]["tokens"].sum())
                padded += batch["tokens"].size
            loss.block_until_ready()
            dt = time.perf_counter() - t0
            print(f"epoch {epoch}: loss {float(loss):.3f}, {tokens / dt:,.0f} real tokens/s, "
                  f"padding {1 - tokens / padded:.0%}, step compiled {step._cache_size()} time(s)")


if __name__ == "__main__":
    main()
