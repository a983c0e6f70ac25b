"""How a batch is laid out and written: its spec, rows, padding, and the builder
that writes a batch into a slot."""
