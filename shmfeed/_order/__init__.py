"""Which samples, in which order, with which random numbers: the keyed epoch order,
length buckets, `shmfeed.rng()`, and the state a run resumes from."""
