"""Ctrl-C that is never lost.

Python raises ``KeyboardInterrupt`` in whichever frame runs when SIGINT arrives. When that frame is a finalizer
(a weakref callback or ``__del__``; torch and its data loader run many), the interpreter prints "Exception
ignored in ..." and carries on, and the Ctrl-C is gone: the run goes to its end. The CLI installs the handler
below, which also records the interrupt; the long loops call ``check()`` at each step, so an interrupt lost in a
finalizer stops the work one step later, where it is handled like any other.
"""

from __future__ import annotations

import signal
import threading

_pending = False


def _handler(signum: int, frame: object) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


def install() -> None:
    """Record every Ctrl-C, where Python's own handler would run (a SIGINT the parent ignores stays ignored).
    Only the main thread may set a handler: called from another thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _handler)


def uninstall() -> None:
    """Python's own handler again, and nothing pending."""
    global _pending
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _pending = False


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a Ctrl-C arrived since ``install()``, even one a finalizer swallowed. It
    stays pending (every later check raises too) until ``uninstall()``: the work stops, not just one loop."""
    if _pending:
        raise KeyboardInterrupt
