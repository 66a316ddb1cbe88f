"""Logging off the event loop: the loop puts records on a queue, a listener thread formats and
writes them.

A handler that writes to a stream on the loop blocks the loop whenever the stream does (a full
pipe nobody reads, a slow terminal, a stalled log shipper), and it formats every line there
(`%`-formatting, `strftime`). With `queued_logging`, `logger.info(...)` costs the loop one
LogRecord and one `SimpleQueue.put`; the formatting and the write happen in the listener's
thread. Stopping the listener (at the end of `orproxy serve`) writes out everything queued, so
no line is lost at shutdown.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _LazyQueueHandler(logging.handlers.QueueHandler):
    """Queues the record as it is: the stdlib's `prepare` formats the message on the caller's
    thread (so the record can be pickled to another process); within one process the listener
    can format it. The proxy's log arguments are strings and numbers, never objects it later
    changes, so formatting later gives the same line."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


@contextmanager
def queued_logging(level: str | int, stream: TextIO) -> Iterator[logging.handlers.QueueListener]:
    """Route the root logger through a queue to `stream` for the duration of the block (replacing
    its handlers); the listener is stopped, and what it had queued written, on the way out."""
    root = logging.getLogger()
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    writer = logging.StreamHandler(stream)
    writer.setFormatter(logging.Formatter(FORMAT))
    listener = logging.handlers.QueueListener(records, writer, respect_handler_level=False)
    handler = _LazyQueueHandler(records)
    previous, previous_level = root.handlers[:], root.level
    for old in previous:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    listener.start()
    try:
        yield listener
    finally:
        root.removeHandler(handler)
        listener.stop()  # enqueues its sentinel after every record already queued, then joins
        writer.flush()
        for old in previous:
            root.addHandler(old)
        root.setLevel(previous_level)
