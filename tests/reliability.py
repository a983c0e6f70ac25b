"""The fault table of RELIABILITY.md: every fault tried, how it is injected, what
happens, which test proves it and, measured by that test, how long it took.

The tests call `record(key, seconds)`; with SHMFEED_RELIABILITY_OUT=path.json set,
the measurements are written there.  Then

    SHMFEED_RELIABILITY_OUT=/tmp/rel.json python -m pytest -q tests/test_faults.py tests/test_stress.py tests/test_edges.py
    python tests/reliability.py /tmp/rel.json

rewrites the table in RELIABILITY.md (between its `faults:begin`/`faults:end`
markers).  tests/test_faults.py checks that the table and FAULTS agree and that every
test named here exists, so neither can drift from the other.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "RELIABILITY.md"
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"


@dataclass(frozen=True)
class Fault:
    key: str
    fault: str
    injection: str
    outcome: str
    measured: str  # what the recorded time measures
    test: str  # file::function


def _t(name: str) -> str:
    return f"test_faults.py::{name}"


FAULTS = [
    Fault("getitem_raises", "Exception in `__getitem__`",
          "`raise ValueError` at sample 17 (batch 4), `num_workers` 0 and 2",
          "`WorkerError` at batch 4 that `except ValueError` also catches, chained from a "
          "`ValueError` with the same message; "
          "message names worker, pid, batch, epoch, sample index and has the worker's "
          "traceback; batches 0-3 delivered intact; next epoch and `close()` work",
          "wait for batch 4 until the error",
          _t("test_exception_in_getitem_raises_worker_error_in_batch_order")),
    Fault("transform_raises", "Exception in a transform (custom, unpicklable type)",
          "a helper called by `__getitem__` raises an exception holding a lock",
          "`WorkerError` chained from an exception of that type and message; the helper's "
          "frame is in the worker traceback", "",
          _t("test_exception_in_a_transform_keeps_its_type_message_and_traceback")),
    Fault("batch_level_raises", "Exception in a batch-level source (`batch_size=None`)",
          "`__getitem__(3)` raises `KeyError`",
          "`WorkerError` at batch 3 naming source batch index 3", "",
          _t("test_exception_in_batch_level_source_names_the_batch")),
    Fault("epoch_hook_raises", "Exception in `on_epoch_end`",
          "the hook raises `RuntimeError` after epoch 0",
          "all batches of the epoch delivered, then `WorkerError` chained from the "
          "`RuntimeError`; the next epoch runs on freshly forked workers", "",
          _t("test_exception_in_on_epoch_end_is_a_worker_error_after_the_epoch")),
    Fault("sys_exit", "`sys.exit()` in user code", "`sys.exit(4)` in `__getitem__`",
          "`WorkerError` chained from `SystemExit`; the worker is not lost", "",
          _t("test_sys_exit_in_a_worker_is_a_worker_error_not_a_dead_worker")),
    Fault("ctrl_c_in_process", "Ctrl-C inside `__getitem__`, `num_workers=0`",
          "`__getitem__` raises `KeyboardInterrupt`",
          "`KeyboardInterrupt` (not a `WorkerError`) reaches the loop; next epoch works", "",
          _t("test_keyboard_interrupt_while_building_in_process_reaches_the_user")),
    Fault("worker_sigkill", "Worker killed by the OOM killer (simulated)",
          "SIGKILL sent by the test to the worker while it builds batch 17",
          "worker replaced, batch 17 rebuilt; the epoch comes out exactly once, in order",
          "kill until batch 17 delivered",
          _t("test_worker_death_is_replaced_and_epoch_completes_in_order[sigkill]")),
    Fault("worker_os_exit", "Worker exits (`os._exit(3)`)", "`os._exit(3)` in `__getitem__`",
          "as above; stderr names the worker, pid, exit code and batch",
          "exit until batch 17 delivered",
          _t("test_worker_death_is_replaced_and_epoch_completes_in_order[os_exit]")),
    Fault("worker_segfault", "Segfault in native code",
          "`ctypes.string_at(0)` in `__getitem__`",
          "as above; SIGSEGV named, the worker's Python stack on stderr (faulthandler)",
          "crash until batch 17 delivered",
          _t("test_worker_death_is_replaced_and_epoch_completes_in_order[segfault]")),
    Fault("random_kills", "Workers killed at random instants",
          "SIGKILL to a random worker every ~30 ms over 2 epochs of 300 small batches",
          "every batch exactly once, in order, with the right content", "",
          _t("test_workers_killed_at_random_instants_never_lose_or_repeat_a_batch")),
    Fault("random_kills_arrays", "Workers killed at random instants inside the C loop of an array source",
          "SIGKILL to a random worker every ~30 ms while `Arrays` workers copy 1 MB batches in C "
          "(csrc/gather.c), at least 3 epochs and 10 kills",
          "every batch exactly once, in order, with the right content", "",
          _t("test_workers_killed_inside_the_c_loop_of_an_array_source_never_lose_or_repeat_a_batch")),
    Fault("max_restarts", "A worker that dies every time",
          "SIGKILL at sample 70 on every attempt, `max_restarts` 0 and 2",
          "`WorkerError`: \"worker 1 (pid 4121) was killed by SIGKILL while building batch "
          "17 of epoch 0; restarted 2 time(s) already, giving up (`max_restarts=2`)...\"; "
          "iterating again raises it again; `close()` is clean", "last death until the error",
          _t("test_deaths_beyond_max_restarts_raise_worker_error_naming_worker_pid_signal_batch")),
    Fault("restarts_lifetime", "Deaths spread over epochs and re-forked workers",
          "one SIGKILL per epoch, with `on_epoch_end` (the workers re-forked each epoch)",
          "`max_restarts` counts over the loader's life: epoch 2's death is fatal", "",
          _t("test_max_restarts_counts_over_the_loaders_life_across_worker_reforks")),
    Fault("supervisor_sigkill", "Supervisor killed", "SIGKILL to the pool's supervisor mid-epoch",
          "`WorkerError` naming the supervisor and SIGKILL; the next epoch starts a new pool "
          "on a repaired ring and completes in order", "kill until the error",
          _t("test_supervisor_killed_raises_worker_error_and_next_epoch_recovers")),
    Fault("reclaim", "Worker killed holding a slot (control plane)",
          "a process acquires a slot (FILLING) and is SIGKILLed",
          "`shmf_reclaim` puts the slot back (ASSIGNED, no owner) and hands its claim to a "
          "replacement, whose batch the consumer takes", "",
          _t("test_slot_of_a_worker_killed_while_filling_is_reclaimed_and_rebuilt")),
    Fault("ctl_stress_c", "Kills at random instructions (C, ASan/UBSan in CI)",
          "csrc/test_ctl.c: 4 workers, ~560 SIGKILLs, abandoned epochs, pinned slots",
          "exactly-once in-order delivery, no claim twice, no stall, no lost wake-up", "run time",
          "test_stress.py::test_control_plane_c_stress_with_random_kills"),
    Fault("ctl_stress_py", "Control-plane stress (Python API)",
          "4 processes x claim/acquire/publish, consumer take/release, >= 10^5 operations",
          "every batch claimed once, delivered once in order, no wait runs out", "run time",
          "test_stress.py::test_control_plane_hammered_by_processes_claims_each_batch_once"),
    Fault("hung_worker", "Hung worker", "`time.sleep(3600)` at sample 70, `timeout_s=0.5`",
          "`WorkerError` \"batch 17 of epoch 0 was not ready after waiting 0.6 s, 0.5 s of "
          "them with no batch published (`timeout_s=0.5`); worker 0 (pid ...) was still building it and has been "
          "killed\"; the worker is replaced; the next epoch completes",
          "time past `timeout_s` until the error",
          _t("test_hung_worker_times_out_naming_the_batch_and_the_wait")),
    Fault("slow_batches", "Slow but progressing batches",
          "0.3 s per batch (1.2 s in all), `timeout_s=0.6`",
          "no error: the timeout is per batch, not per epoch", "",
          _t("test_slow_but_progressing_batches_do_not_time_out")),
    Fault("training_sigkill", "Training process killed",
          "`kill -9` of a training script (fork and spawn) while workers are in `__getitem__`",
          "supervisor and workers exit on their own (PR_SET_PDEATHSIG); no file in /dev/shm "
          "or $TMPDIR (the ring is a memfd)", "kill until every pool process exited",
          _t("test_training_process_sigkill_leaves_no_process_or_file")),
    Fault("thread_loader", "Loader made in a thread that exits, then training killed",
          "the Loader is built in a short-lived thread; later `kill -9` of the script",
          "the pool outlives the thread; after the kill it exits (pidfd liveness check)",
          "kill until every pool process exited",
          _t("test_loader_made_in_a_thread_outlives_it_and_dies_with_the_training_process")),
    Fault("ctrl_c", "Ctrl-C in the training loop",
          "SIGINT to the script's process group, while waiting for a batch and during a "
          "step (fork and spawn)",
          "`KeyboardInterrupt` in the loop; no traceback from any worker; pool gone",
          "SIGINT until `KeyboardInterrupt` caught",
          _t("test_ctrl_c_raises_keyboard_interrupt_promptly_and_workers_exit_quietly")),
    Fault("ctrl_c_fork", "Ctrl-C during `os.fork()` of the pool",
          "an at-fork hook sends SIGINT to the process",
          "`KeyboardInterrupt` from the `Loader(...)` call (Python would drop one raised "
          "inside an at-fork hook), no process left", "",
          _t("test_ctrl_c_during_pool_fork_is_raised_not_swallowed")),
    Fault("ctrl_c_spawn", "Ctrl-C while a spawned pool starts",
          "SIGINT to the process group right after `Loader(start_method='spawn')`",
          "`KeyboardInterrupt` in the script only; the new interpreter (own process group) "
          "prints nothing", "",
          _t("test_ctrl_c_while_a_spawned_pool_starts_prints_no_child_traceback")),
    Fault("close_frees", "Closed loader kept referenced",
          "`close()` after an epoch over a 128 MiB ring; 50 closed loaders kept in a list",
          "the ring is unmapped and its descriptor closed at `close()`; a batch kept past "
          "`close()` keeps the mapping until it dies", "",
          "test_edges.py::test_close_frees_the_ring_and_its_fd_while_the_loader_object_lives"),
    Fault("forked_child", "Batch read in a fork-started child",
          "`multiprocessing` fork context child sums a batch it was handed",
          "it reads the values (no SIGSEGV); another loader's pool maps no ring but its own", "",
          "test_edges.py::test_batch_handed_to_a_fork_started_child_can_be_read_there"),
    Fault("stopped_training_process", "Training process stopped (SIGSTOP, debugger)",
          "SIGSTOP of the training process alone for 3 s, `timeout_s=1`",
          "no timeout, no kill, no restart: only time the consumer ran with no batch "
          "published counts", "from SIGCONT to the script's end (2 epochs)",
          "test_edges.py::test_stopping_the_training_process_longer_than_timeout_is_not_a_timeout[training_process]"),
    Fault("stopped_process_group", "Ctrl-Z then `fg` (whole process group)",
          "SIGSTOP of the script's process group (trainer, supervisor, workers) for 3 s, `timeout_s=1`",
          "no timeout, no kill, no restart", "from SIGCONT to the script's end (2 epochs)",
          "test_edges.py::test_stopping_the_training_process_longer_than_timeout_is_not_a_timeout[process_group]"),
    Fault("stopped_worker", "Worker stopped between batches",
          "SIGSTOP of one of 2 workers mid-epoch",
          "replaced after 2 s stopped (not counted against `max_restarts`), its batch rebuilt; "
          "the epoch exact", "SIGSTOP to the worker's replacement",
          "test_edges.py::test_a_worker_stopped_between_batches_is_replaced_not_left_idle"),
    Fault("stopped_supervisor", "Supervisor stopped, then its workers killed",
          "SIGSTOP of the supervisor, SIGKILL of both workers, `timeout_s=1`",
          "`WorkerError` naming the stopped supervisor and `kill -CONT <pid>`; after SIGCONT "
          "the next epoch completes", "time past `timeout_s` until the error",
          "test_edges.py::test_a_stopped_supervisor_is_named_when_a_batch_times_out"),
    Fault("rlimit_as", "Ring beyond `RLIMIT_AS`",
          "2 GiB ring under `RLIMIT_AS` = VM size + 256 MiB, three times",
          "`RingMemoryError` naming the ring size, the limit and `num_slots`/`memory_budget_bytes`; "
          "no descriptor leaked", "",
          "test_edges.py::test_ring_beyond_rlimit_as_is_refused_naming_ring_limit_and_knobs_leaking_nothing"),
    Fault("cgroup_limit", "Ring beyond a memory cgroup's limit",
          "1 GiB ring in a child memory cgroup limited to 512 MiB (skipped where none can be made)",
          "`RingMemoryError` at construction, before any OOM kill", "",
          "test_edges.py::test_ring_beyond_a_memory_cgroup_limit_is_refused_before_the_oom_killer"),
    Fault("close_no_fds", "`close()` with no descriptor left",
          "`RLIMIT_NOFILE` lowered to the descriptors already open, then `close()`",
          "the pool is stopped anyway (failures reported after)", "duration of `close()`",
          "test_edges.py::test_close_with_no_descriptor_left_still_stops_the_pool"),
    Fault("two_threads", "Two threads iterating one loader",
          "a second thread iterates while the first is mid-epoch; the first's iterator advanced from another thread",
          "an immediate `ShmfeedError` saying one loader feeds one loop", "until the error",
          "test_edges.py::test_a_second_thread_iterating_the_same_loader_gets_an_immediate_clear_error"),
    Fault("close_other_thread", "`close()` from another thread, `num_workers=0`",
          "a timer thread closes the loader while the loop builds batches",
          "`LoaderClosedError` in the loop, not a `WorkerError` blaming the source", "",
          "test_edges.py::test_close_from_another_thread_with_num_workers_0_is_a_closed_error_not_a_worker_error"),
    Fault("close_other_thread_storm", "`close()` from another thread at a random instant, `num_workers=0`",
          "a timer thread closes the loader 0-20 ms into its loop: 20 trials, 200 in the `integration` storm",
          "always `LoaderClosedError`, never the internal `LeaveBuild` (was 29 of 100 trials)", "",
          "test_exit.py::test_close_from_another_thread_at_random_instants_is_always_loader_closed_error"),
    Fault("close_many", "`close()` of several loaders, workers mid-sample",
          "3 loaders (`num_workers=2`) whose workers sleep in `__getitem__`, closed one after the other: "
          "fork, fork server (made after JAX started), spawn",
          "each `close()` within ~50 ms + exit (`WORKER_GRACE_S`; the goal is 100 ms, the test "
          "bound 1 s); the fork server's second supervisor used to wait 4 s to be reaped", "",
          "test_close.py::test_every_close_of_several_loaders_is_fast_even_with_workers_mid_sample"),
    Fault("feed_at_exit", "A `prefetch_to_device` feed still referenced at exit",
          "the script ends with the feed referenced mid-epoch (and, in the `integration` storm, "
          "200 Ctrl-Cs at random instants of a top-level prefetch loop, one script each)",
          "nothing printed: an atexit hook closes the feed before the interpreter's teardown "
          "(was `Exception ignored in Prefetch.__del__ ... TypeError`)", "",
          "test_exit.py::test_a_feed_still_referenced_at_exit_leaves_quietly"),
    Fault("ctrl_c_feed_cleanup", "Ctrl-C while a dropped feed is cleaned up",
          "SIGINT raised inside a dropped feed's cleanup (its source's `close()`); in the "
          "`integration` storm, 200 Ctrl-Cs at random instants of a loop of short prefetch epochs",
          "`KeyboardInterrupt` in the loop once the cleanup is done (the feed's `finally` holds it "
          "back, and raises it once its frame is gone); never printed and dropped while training "
          "goes on", "",
          "test_exit.py::test_ctrl_c_while_a_dropped_feed_is_cleaned_up_is_raised_after_it"),
    Fault("jit_views", "Batch views passed straight into an async jitted step",
          "a jitted step ~10x slower than the loader, 20 epochs, 3 slots, `num_workers` 0 and 2: "
          "queued steps and JAX's deferred release hold every slot",
          "no `RingFullError`: the take waits for the steps in flight and drives JAX's release; "
          "each step read its own batch", "",
          "test_jax.py::test_a_jitted_step_slower_than_the_loader_takes_the_views_for_20_epochs"),
    Fault("every_batch_kept", "Every batch kept (with JAX steps running)",
          "the loop appends each batch to a list, 4 slots",
          "`RingFullError` within 2 s of the last step, naming the batches held (epoch 0: "
          "batches 0-3) and the remedy (`np.array(x)`, `num_slots`)", "",
          "test_jax.py::test_keeping_every_batch_raises_ring_full_error_promptly_naming_them"),
    Fault("pid1", "Training process is PID 1 (container without init)",
          "a PID namespace (`unshare --pid`); the supervisor SIGKILLed three times",
          "its orphaned workers are reaped: no zombie left", "",
          "test_edges.py::test_as_pid_1_dead_pools_leave_no_zombies"),
    Fault("leak_fixture", "A test that leaks",
          "pytest run on tests that leave a child, an fd, a /dev/shm file, an open Loader",
          "each such test fails (the autouse fixture of tests/conftest.py)", "",
          _t("test_leak_fixture_fails_tests_that_leave_a_process_fd_or_shm_file")),
    Fault("soak", "Long run (soak)", "100,000 tiny batches over many epochs, 2 workers",
          "RSS of training process and workers flat (< 5 % growth after warm-up), fds and "
          "children constant", "run time",
          "test_stress.py::test_soak_memory_fds_and_children_stay_flat"),
    Fault("state_pickle_payload", "A checkpoint edited to run code on loading",
          "the state's `source` field replaced by a pickle (or an object-dtype array of one) "
          "whose loading would create a file",
          "`SpecError` naming `source`; nothing is unpickled, the file is never created", "",
          "test_resume.py::test_an_edited_checkpoint_with_a_pickle_payload_runs_no_code"),
    Fault("state_fuzz", "Malformed resume states",
          "hypothesis: each field of a real state (with the tutorial generator's attributes) "
          "replaced by an odd value or deleted, 300 cases",
          "the state loads, or a `ShmfeedError` names the field; no other exception, the source "
          "untouched", "",
          "test_resume.py::test_a_malformed_state_is_a_shmfeed_error_naming_the_field"),
    Fault("state_not_data", "A hooked source with an attribute that is not data",
          "a `threading.Lock` attribute, then `state_dict()`",
          "`SpecError` naming `source.lock`, with the remedy (`state_dict`/`load_state_dict`)", "",
          "test_resume.py::test_state_of_a_hooked_source_that_is_not_data_names_the_attribute"),
    Fault("ring_too_big", "A ring far beyond memory",
          "`num_slots=10**8`, `num_slots=2**40`, `memory_budget_bytes=2**50`",
          "`RingMemoryError`/`SpecError` naming `num_slots`, decided arithmetically: < 0.5 s and "
          "<= 1 MB allocated (it took 6 s and 3.9 GB)", "",
          "test_edges.py::test_a_ring_too_big_is_refused_in_milliseconds_before_any_memory_is_spent"),
    Fault("epoch_64_bits", "An epoch beyond 64 bits",
          "`set_epoch(2**64 + 3)`, a state with that epoch, iterating past epoch 2^64-1",
          "`SpecError` naming `epoch` (it gave epoch 3's batches); past the last epoch a "
          "`ShmfeedError`", "",
          "test_edges.py::test_an_epoch_beyond_64_bits_is_refused_not_wrapped_to_a_small_one"),
    Fault("padded_overflow", "A padded shape beyond what numpy holds",
          "`padded_shapes=(2**64,)` and `(2**62,)`",
          "`SpecError` naming `padded_shapes` and the byte count (it was an `OverflowError`)", "",
          "test_edges.py::test_a_padded_shape_beyond_what_numpy_holds_is_a_spec_error_not_an_overflow"),
    Fault("bench_data_dir", "`shmfeed bench` with a data folder it cannot use",
          "`--data-dir /dev/null`",
          "one line naming the folder and the error, `--data-dir`/`$SHMFEED_BENCH_DATA` as the fix; "
          "exit 2, no traceback", "",
          "test_cli.py::test_a_data_dir_that_is_a_file_is_one_line_not_a_traceback"),
    Fault("bench_cache_dir", "`shmfeed bench` with an unwritable default cache folder",
          "`$XDG_CACHE_HOME` under a file", "as above", "",
          "test_cli.py::test_an_unwritable_default_cache_folder_is_one_line_not_a_traceback"),
    Fault("bench_read_only", "`shmfeed bench` with a read-only data folder",
          "a read-only tmpfs mounted in a private mount namespace (skipped where none can be made)",
          "as above, naming `Read-only file system`", "",
          "test_cli.py::test_a_read_only_data_dir_is_one_line"),
    Fault("bench_too_big", "`shmfeed bench` batches or ring beyond memory",
          "`--batch-size 1000000000`, `--slots 1000000000` (and `1e9`, `10000000000`)",
          "one line with the batch and ring sizes, the limit and `Lower --batch-size or --slots`; "
          "exit 2 before anything is allocated (it allocated for minutes, or a numpy traceback)", "",
          "test_cli.py::test_batches_or_a_ring_beyond_memory_are_refused_before_allocating"),
    Fault("bench_64mb", "`shmfeed bench` in a 64 MB container",
          "`RLIMIT_AS` 64 MB above what the CLI has mapped (the check that reads the cgroup limit too)",
          "one line naming `RLIMIT_AS`, exit 2", "",
          "test_cli.py::test_a_ring_beyond_a_64_mb_memory_limit_is_one_line"),
    Fault("bench_dev_shm", "`/dev/shm` unusable or 1 MB",
          "a read-only (or 1 MB) tmpfs on /dev/shm in a private mount namespace, `--compare pickle` "
          "(and the torch check)",
          "shmfeed runs (its ring is a memfd); a peer that needs /dev/shm is one line naming it and "
          "`--shm-size`, exit 2", "",
          "test_cli.py::test_a_dev_shm_a_peer_cannot_use_is_one_line_and_shmfeed_runs_without_it"),
    Fault("slow_unpickle", "A source slow to unpickle in a spawned pool",
          "`__setstate__` sleeps 1.5 s in the supervisor, `timeout_s=0.5`",
          "every batch delivered: the pool's start does not count towards `timeout_s` (it was "
          "\"no worker had claimed it\")", "",
          "test_edges.py::test_a_pool_slow_to_unpickle_the_source_is_not_timed_out_as_a_stuck_worker"),
    Fault("never_started", "A pool that never finishes starting",
          "`__setstate__` sleeps 60 s, the startup bound lowered to 1 s",
          "`WorkerError` saying the pool is still starting, with the remedy", "",
          "test_edges.py::test_a_pool_that_never_finishes_starting_is_reported_as_starting"),
    Fault("stream_make_changes", "A `Stream` whose `make` gives other samples when called again",
          "`make` orders each shard by an unseeded RNG (the reading pid); SIGKILL of a worker after "
          "6 batches (and the same with a steady `make`)",
          "`SpecError` \"gave other samples when called again\" in batch order, nothing repeated before "
          "it (it lost and repeated samples silently); a steady `make` delivers every sample once", "",
          "test_streams.py::test_a_make_that_gives_other_samples_when_called_again_is_caught_after_a_kill"),
    Fault("stream_ignores_shard", "A `Stream` whose `make` ignores its shard index",
          "every shard is the whole stream",
          "`SpecError` at construction: the first two shards start alike, the stream would come "
          "`num_shards` times", "",
          "test_streams.py::test_a_make_that_ignores_its_shard_index_is_refused"),
    Fault("stream_error_names", "An exception in a shard of a `Stream`",
          "`raise ValueError` at sample 7 of shard 2, `num_workers` 0 and 2",
          "`WorkerError` \"... at sample 7 of shard 2\" (it said \"sample index 8589934599\")", "",
          "test_streams.py::test_an_error_in_a_shard_names_the_sample_and_shard_not_an_internal_key"),
]
BY_KEY = {f.key: f for f in FAULTS}

_measured: dict[str, list[float]] = {}


def record(key: str, seconds: float) -> None:
    """Remember a measured time for fault `key` (see the module docstring)."""
    if key not in BY_KEY:
        raise KeyError(f"{key!r} is not in tests/reliability.py FAULTS")
    _measured.setdefault(key, []).append(round(float(seconds), 4))
    out = os.environ.get("SHMFEED_RELIABILITY_OUT")
    if out:
        path = Path(out)
        data = json.loads(path.read_text()) if path.exists() else {}
        data.setdefault(key, []).append(round(float(seconds), 4))
        path.write_text(json.dumps(data, indent=1, sort_keys=True))


def _cell(s: str) -> str:
    return s.replace("|", "\\|")


def render(measured: dict[str, list[float]]) -> str:
    rows = ["| Fault | Injected by | Outcome | Time (measured: what) | Test |",
            "|---|---|---|---|---|"]
    for f in FAULTS:
        times = measured.get(f.key)
        if f.measured and times:
            t = max(times)
            when = (f"{t * 1000:.1f} ms" if t < 0.1 else f"{t:.2f} s") + f" ({f.measured}; max of {len(times)})"
        elif f.measured:
            when = f"not measured ({f.measured})"
        else:
            when = "—"
        rows.append(f"| {_cell(f.fault)} | {_cell(f.injection)} | {_cell(f.outcome)} | "
                    f"{_cell(when)} | `{f.test}` |")
    return "\n".join(rows)


def table_rows(doc: str) -> list[tuple[str, str]]:
    """(fault, test) of each row of the table in `doc`."""
    body = doc.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = []
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows.append((cells[0].replace("\\|", "|"), cells[-1].strip("`")))
    return rows


def main(argv: list[str]) -> None:
    measured = json.loads(Path(argv[1]).read_text()) if len(argv) > 1 else {}
    doc = DOC.read_text()
    head, rest = doc.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(f"{head}{BEGIN}\n{render(measured)}\n{END}{tail}")
    print(f"rewrote the table in {DOC} ({len(FAULTS)} faults)")


if __name__ == "__main__":
    main(sys.argv)
