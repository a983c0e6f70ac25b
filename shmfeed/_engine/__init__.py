"""The control block and what crosses it: the ring of slots, the reports a worker
writes beside each slot, and the statistics read from both."""
