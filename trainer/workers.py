"""DataLoader worker processes and stop signals: `ignore_stop_signals`."""

from __future__ import annotations

import signal

#: The signals that ask a training run to stop: Ctrl-C, what `kill`, Slurm and systemd send, and
#: SIGHUP, which a terminal that closes sends (an SSH session dropped without tmux or nohup).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []))


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn`` after which the worker ignores SIGINT, SIGTERM and SIGHUP.

    A signal sent to a whole process group (Ctrl-C in a terminal, Slurm's and systemd's SIGTERM)
    reaches the DataLoader's workers too. Unhandled there, SIGTERM kills them and the main
    process fails with "DataLoader worker ... killed by signal" instead of stopping cleanly;
    SIGINT runs whatever handler the worker inherited from the main process. Ignoring both
    leaves the decision to the main process, which stops the workers when it stops:
    ``DataLoader(dataset, num_workers=2, worker_init_fn=ignore_stop_signals)``. To combine it
    with your own initialisation, call it from your ``worker_init_fn``. Not with
    ``persistent_workers=True``: Python ends workers still running at its exit with SIGTERM,
    which they would ignore, so the process would wait for them forever.

    Args:
        worker_id: the worker's index, as the DataLoader passes it (not used).
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
