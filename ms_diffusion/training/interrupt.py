"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler), and stopping a diverged one.

Why a plain ``signal.signal`` handler is not enough under MindSpore (2.10, measured with strace): the
runtime's queue worker threads (``AsyncRQueue::WorkerLoop`` and friends, in libmindspore_runtime_pipeline
and libmindspore_ms_backend) install a C-level SIGINT handler (``SignalGuard``) whose only action is
``kill(getpid(), SIGTERM)``; they re-install it on every step, and as these guards save and restore each
other from several threads, the process keeps it after the first op. Python's own SIGINT handler never
runs: a Ctrl-C becomes a SIGTERM, whose default action ends the process at once (exit -15, nothing
saved). The dataset pipeline is not involved, and MindSpore never touches SIGTERM.

So ``train.py`` blocks SIGINT and SIGTERM (``signal.pthread_sigmask``) before any import starts a thread
(numpy's BLAS does): every thread inherits the mask, MindSpore's included, so no C handler ever sees
them, and ``watch_signals`` receives them in a thread of its own with ``sigwait``. Where that was not done
(the library called from a script or a notebook), Python handlers are installed instead; a Ctrl-C then
still stops the run cleanly, but it usually arrives as the SIGTERM MindSpore makes of it, and is reported
(and exits) as such.

What a signal does depends on where the process is:

* inside ``graceful_stop()`` (a trainer's loop, single process): the first signal only sets
  ``signum``; the loop finishes its step, saves a checkpoint and raises ``TrainingInterrupted``; a
  second signal aborts at once (``os._exit(128 + signum)``, after removing temporary files);
* in a data-parallel run's loop (``graceful_stop(enabled=False)``: the ranks cannot agree on a step to
  stop at, and a rank waiting in a collective for one that left would hang): the process ends at once;
* elsewhere (start-up): the main thread gets ``Interrupted`` (a ``KeyboardInterrupt``) at its next
  Python instruction, so clean-up code runs; a second signal aborts at once.

Exit status ``128 + signum``: 130 for SIGINT, 143 for SIGTERM, as a shell reports a process ended by them.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator, List, Optional

__all__ = ["Interrupted", "TrainingInterrupted", "TrainingDiverged", "watch_signals", "graceful_stop",
           "signal_name", "StopWatcher", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    """``SIGINT``, ``SIGTERM``, ... for a signal number."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by ``signum`` (SIGINT or SIGTERM); ``exit_code`` is 128 + signum."""

    def __init__(self, signum: int, message: str = ""):
        self.signum = int(signum)
        super().__init__(message or f"interrupted by {signal_name(self.signum)}")

    @property
    def signal_name(self) -> str:
        return signal_name(self.signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class TrainingInterrupted(Interrupted):
    """A trainer stopped on a signal after finishing its step; ``checkpoint`` holds that step (None if the
    signal came before this session's first update: then nothing new was trained)."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.step = int(step)
        self.checkpoint = checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "no new checkpoint"
        super().__init__(signum, f"stopped by {signal_name(signum)} at step {self.step}; {where}")


class TrainingDiverged(RuntimeError):
    """``max_bad_steps`` consecutive updates had a non-finite loss or gradient; nothing was saved for them."""

    def __init__(self, message: str, *, step: int, bad_steps: int, checkpoint=None):
        super().__init__(message)
        self.step, self.bad_steps, self.checkpoint = int(step), int(bad_steps), checkpoint


def _blocked_in_every_thread(signums) -> bool:
    """True if every thread of this process blocks all ``signums`` (Linux: /proc/self/task/*/status)."""
    if not sys.platform.startswith("linux"):
        return False
    bits = 0
    for s in signums:
        bits |= 1 << (int(s) - 1)
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/status") as f:
                mask = next((int(line.split()[1], 16) for line in f if line.startswith("SigBlk:")), 0)
            if mask & bits != bits:
                return False
    except (OSError, ValueError, IndexError):
        return False
    return True


def _interrupt_main(signum: int) -> None:
    """Run the main thread's Python handler for ``signum`` at its next instruction (from another thread)."""
    import _thread

    if sys.version_info >= (3, 10):
        _thread.interrupt_main(signum)
    else:  # pragma: no cover - SIGINT only before 3.10
        _thread.interrupt_main()


def _say(text: str) -> None:
    """Write to stderr from a signal handler or thread: a raw write, never a buffered (reentrant) one."""
    try:
        os.write(2, text.encode(errors="replace"))
    except OSError:
        pass


class StopWatcher:
    """Receives SIGINT / SIGTERM for the whole process; see the module docstring. One per process."""

    def __init__(self):
        self.signum: Optional[int] = None     # the first stop signal received
        self.prog = "train"
        self._graceful = 0                    # depth of graceful_stop() blocks
        self._immediate = 0                   # depth of blocks where a signal ends the process at once
        self._forwarded: Optional[int] = None  # a signal the watcher thread handed to the main thread
        self._cleanups: List[Callable[[], None]] = []
        self._folders: List[str] = []          # run folders of the graceful blocks, innermost last
        #: ``resume_hint(run_folder) -> command`` printed after an abort (set by train.py's main)
        self.resume_hint: Optional[Callable[[str], str]] = None
        self._previous = {}
        self._installed = 0
        self._thread: Optional[threading.Thread] = None

    # -- set-up
    def install(self) -> None:
        """Take over SIGINT / SIGTERM (main thread only; nested installs are counted)."""
        self._installed += 1
        if self._installed > 1:
            return
        self.signum, self._forwarded = None, None
        for s in STOP_SIGNALS:
            # a signal ignored from the start stays ignored (``cmd &`` in a script ignores SIGINT; Python
            # keeps that too)
            if signal.getsignal(s) is not signal.SIG_IGN:
                self._previous[s] = signal.signal(s, self._handler)
        if self._thread is None and hasattr(signal, "sigwait") and _blocked_in_every_thread(STOP_SIGNALS):
            self._thread = threading.Thread(target=self._wait_loop, name="ms_diffusion-signals", daemon=True)
            self._thread.start()
        elif self._thread is None and hasattr(signal, "pthread_sigmask"):
            # not blocked everywhere (an early thread): signals must reach the handlers instead
            signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS))

    def uninstall(self) -> None:
        self._installed -= 1
        if self._installed > 0:
            return
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
        # a sigwait thread stays: the signals are blocked everywhere and it hands them to the main thread

    @property
    def uses_thread(self) -> bool:
        return self._thread is not None

    # -- delivery
    def _wait_loop(self) -> None:
        while True:
            signum = signal.sigwait(set(STOP_SIGNALS))
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue
            if self._installed:
                self._deliver(signum, in_main=False)
            else:
                self._default_action(signum)

    @staticmethod
    def _default_action(signum: int) -> None:
        """No watcher any more (the signals stay blocked): do what the current Python handler would."""
        handler = signal.getsignal(signum)
        if handler is signal.SIG_IGN:
            return
        if callable(handler):
            _interrupt_main(signum)
        else:   # SIG_DFL: SIGINT and SIGTERM end the process
            os._exit(128 + signum)

    def _handler(self, signum, frame) -> None:
        forwarded, self._forwarded = self._forwarded, None
        if forwarded is not None:          # handed over by the watcher thread: raise it here
            raise Interrupted(forwarded)
        self._deliver(signum, in_main=True)

    def _deliver(self, signum: int, in_main: bool) -> None:
        if self.signum is not None:
            self._abort(signum)
        self.signum = signum
        if self._immediate and not self._graceful:
            self._run_cleanups()
            _say(f"\n{self.prog}: {signal_name(signum)} received: a data-parallel run stops at once (its ranks "
                 f"cannot finish a step without each other); continue from the last checkpoint with --resume\n")
            os._exit(128 + signum)
        if self._graceful:
            again = "Ctrl-C" if signum == signal.SIGINT else signal_name(signum)
            _say(f"\n{self.prog}: {signal_name(signum)} received: finishing this step, then saving a checkpoint and "
                 f"stopping ({again} again to abort at once, losing the steps since the last checkpoint)\n")
            return
        if in_main:
            raise Interrupted(signum)
        self._forwarded = signum
        _interrupt_main(signum)

    def _run_cleanups(self) -> None:
        for cleanup in list(self._cleanups):
            try:
                cleanup()
            except Exception:  # nothing may stop an abort
                pass

    def _abort(self, signum: int) -> None:
        self._run_cleanups()
        note = ""
        if self._folders:
            try:
                hint = self.resume_hint(self._folders[-1]) if self.resume_hint is not None else None
            except Exception:
                hint = None
            note = (f"\n{self.prog}: resume from the last checkpoint with: {hint}" if hint else
                    f" (the last checkpoint is in {self._folders[-1]})")
        _say(f"\n{self.prog}: {signal_name(signum)} again: aborted at once, without saving{note}\n")
        os._exit(128 + signum)

    # -- the trainer's side
    @contextlib.contextmanager
    def graceful(self, cleanup: Optional[Callable[[], None]] = None, folder=None) -> Iterator["StopWatcher"]:
        """Within the block the first signal only sets ``signum``; ``cleanup`` runs before an abort, whose
        message names ``folder`` (the run folder) or the command that resumes it."""
        self._graceful += 1
        if cleanup is not None:
            self._cleanups.append(cleanup)
        if folder is not None:
            self._folders.append(str(folder))
        try:
            yield self
        finally:
            self._graceful -= 1
            if cleanup is not None:
                self._cleanups.remove(cleanup)
            if folder is not None:
                self._folders.remove(str(folder))

    @contextlib.contextmanager
    def immediate(self, cleanup: Optional[Callable[[], None]] = None) -> Iterator["StopWatcher"]:
        """Within the block a signal ends the process at once (exit 128 + signum), after ``cleanup``."""
        self._immediate += 1
        if cleanup is not None:
            self._cleanups.append(cleanup)
        try:
            yield self
        finally:
            self._immediate -= 1
            if cleanup is not None:
                self._cleanups.remove(cleanup)


_WATCHER = StopWatcher()


@contextlib.contextmanager
def watch_signals(prog: str = "train") -> Iterator[StopWatcher]:
    """Handle SIGINT / SIGTERM for the duration (main thread; elsewhere a no-op). A command's ``main`` wraps
    its whole run in it; its script blocks both signals before any import (see train.py)."""
    if threading.current_thread() is not threading.main_thread():
        yield _WATCHER
        return
    _WATCHER.prog = prog
    _WATCHER.install()
    try:
        yield _WATCHER
    finally:
        _WATCHER.uninstall()


class _NoStop:
    """What a trainer sees where signals cannot be handled (not the main thread) or must not be (ranks)."""

    signum = None


@contextlib.contextmanager
def graceful_stop(enabled: bool = True, cleanup: Optional[Callable[[], None]] = None, folder=None):
    """For a training loop: yields an object whose ``signum`` becomes the first stop signal received.

    Installs the handlers for the duration unless ``watch_signals`` already did (a script or notebook
    calling ``fit`` directly). With ``enabled`` False (the ranks of a data-parallel run, which cannot
    agree on a step to stop at) a signal ends the process at once, as it would without any handler, and
    ``signum`` stays None; off the main thread nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield _NoStop()
        return
    if not enabled:
        with watch_signals(_WATCHER.prog), _WATCHER.immediate(cleanup):
            yield _NoStop()
        return
    with watch_signals(_WATCHER.prog), _WATCHER.graceful(cleanup, folder):
        yield _WATCHER
