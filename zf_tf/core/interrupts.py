"""SIGINT and SIGTERM end every mode within seconds, whatever the main thread is doing.

Python runs its signal handlers in the main thread between bytecodes, so a process whose
main thread waits inside TensorFlow (a collective waiting for a peer, a dataset iterator,
a server) would not see Ctrl-C or SIGTERM until that call returned, perhaps never.
`install` (main.py calls it first, before TensorFlow starts its threads) blocks both
signals in every thread and waits for them in one of its own: on a signal it says so on
stderr and raises KeyboardInterrupt in the main thread, so `finally` blocks remove
temporaries and release the workdir lock; if the main thread has not ended the process
after `grace` seconds, the process exits with status 128 + the signal's number. Every
file a run keeps is written atomically (temporary, then rename), so what a forced exit
leaves is resumable state: rerunning the same command continues.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_SECONDS = 3.0
POLL_SECONDS = 0.25
received: list[int] = []  # the signal that stopped the run (cli turns it into the status)


def install(grace: float = GRACE_SECONDS) -> None:
    """Routes SIGINT and SIGTERM to a waiting thread (module doc). Call it before any
    other thread starts: threads inherit the signal mask of the thread creating them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)

    def wait():
        # In short waits, not one long one: while the main thread holds the GIL inside
        # TensorFlow this thread is out of the wait, so a signal stays pending where a
        # watchdog process can see it (`training.strategies`).
        while (info := signal.sigtimedwait(SIGNALS, POLL_SECONDS)) is None:
            pass
        signum = info.si_signo
        received.append(signum)
        name = signal.Signals(signum).name
        print(f"\n{name}: stopping (rerun the same command to resume)", file=sys.stderr, flush=True)
        _thread.interrupt_main()  # KeyboardInterrupt in the main thread
        time.sleep(grace)
        os._exit(128 + signum)

    threading.Thread(target=wait, name="zf_tf-signals", daemon=True).start()


def exit_status() -> int:
    """128 + the number of the signal received (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + (received[0] if received else signal.SIGINT)
