"""SIGTERM (``timeout``, make, CI, a scheduler) and SIGINT (Ctrl+C) stop a stage as a failure, never as success.

Within :func:`signals_interrupt` either signal raises :class:`StageInterrupted` in the main thread, so the stage
unwinds (its MLflow run marked KILLED, its outputs not published) and the process exits with 128 + the signal's
number, as a shell reports a process killed by it. Lightning's own SIGTERM handler (which would end the fit and
exit 0) runs first and then hands over to this one. Code that fails while unwinding from the signal (a checkpoint
half written when it came, say) raises another exception chained to it; that still counts as the signal.

A signal that arrives while the MLflow store is writing waits until the write is done: an exception raised inside
a store transaction leaves sqlite locked (or the session broken) in this process, and the run could then not be
marked KILLED at all. The signal is sent again every ``RETRY_S`` until it lands outside the store; once the block
has ended no retry is sent (it would meet the restored default handler and kill the process uncounted), and a
block that ended with a signal still waiting exits as that signal. Lightning answers SIGTERM by ending the fit with
its own ``SIGTERMException``; that counts as the signal too.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)
STORE_MODULES = ("mlflow.store", "sqlalchemy", "sqlite3")  # where an exception can leave the tracking store wedged
RETRY_S = 0.01


class StageInterrupted(BaseException):
    """A stopping signal arrived. A BaseException, like KeyboardInterrupt: ``except Exception`` does not catch it."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def in_store(frame) -> bool:
    """Whether ``frame`` or a caller of it runs code of the tracking store (``STORE_MODULES``)."""
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(STORE_MODULES):
            return True
        frame = frame.f_back
    return False


def interrupting_signal(exc: BaseException) -> int | None:
    """The signal behind ``exc``: its own if it is a StageInterrupted, else that of a StageInterrupted it was raised
    while handling (its ``__context__`` chain); None if no signal is involved."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, StageInterrupted):
            return exc.signum
        if isinstance(exc, lightning_sigterm()):
            return signal.SIGTERM
        seen.add(id(exc))
        exc = exc.__context__
    return None


@contextmanager
def signals_interrupt():
    """SIGTERM and SIGINT raise StageInterrupted inside the block; one that ends it exits the process with
    128 + the signal's number. Outside the main thread (where Python delivers no signals) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    waiting: list[int] = []  # signals that landed inside a store write and are being sent again
    open_block = threading.Lock()  # held by a retry while it sends, so the handlers are not restored in between
    active = True

    def resend(signum: int) -> None:
        with open_block:
            if active:
                os.kill(os.getpid(), signum)

    def interrupt(signum: int, frame) -> None:
        if active and not in_store(frame):
            raise StageInterrupted(signum)
        waiting.append(signum)  # inside a store write, or the block is closing: noted, not raised
        if active:
            threading.Timer(RETRY_S, resend, (signum,)).start()

    previous = {signum: signal.signal(signum, interrupt) for signum in SIGNALS}
    try:
        yield
    except BaseException as err:
        signum = interrupting_signal(err) or (waiting[0] if waiting else None)
        if signum is None:
            raise
        raise SystemExit(128 + signum) from err
    finally:
        active = False
        with open_block:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    if waiting:
        raise SystemExit(128 + waiting[0])


def lightning_sigterm() -> tuple[type, ...]:
    """Lightning's SIGTERMException, if Lightning is loaded (the fit loop raises it after its SIGTERM handler ran)."""
    exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return (exceptions.SIGTERMException,) if exceptions else ()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
