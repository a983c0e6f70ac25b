"""The processes: the pool and its supervisor, the fork server, the workers, the
copy of the source each one runs, and a loader's pool over its life."""
