"""The `shmfeed` command: `bench` (the harness in bench/) and `doctor`."""
