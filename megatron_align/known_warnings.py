"""Megatron-Core warnings we have acted on, replaced by one line of ours; every other warning still shows.

A warning we decided about (docs/megatron_core_versions.md) but which Megatron-Core repeats on every model
chunk or every load buries the warnings nobody has looked at yet. :func:`drop_known_record` installs a
filter on the one logger that emits it, matching the start of the message, and logs ``note`` once
instead. tests/test_stacks.py checks that the text still matches what the installed version logs.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class _KnownRecord(logging.Filter):
    def __init__(self, prefix: str, note: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.note = note
        self.noted = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if not self.noted:
            self.noted = True
            log.info(self.note)
        return False


def drop_known_record(logger_name: str, prefix: str, note: str) -> None:
    """Drop records of ``logger_name`` whose message starts with ``prefix``; log ``note`` once (idempotent)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _KnownRecord) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(_KnownRecord(prefix, note))
