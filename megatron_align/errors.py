"""Errors a user can act on. The CLI prints them without a traceback and exits 2."""

import contextlib


class UserError(Exception):
    """A problem the user can fix (bad config value, missing file, wrong layout)."""


class ConfigError(UserError, ValueError):
    """Invalid configuration; the message names the key (e.g. ``parallel.tensor``) and what to do."""


@contextlib.contextmanager
def refused_by_megatron(what: str):
    """Turn a check Megatron-Core makes itself (an ``assert`` or ``ValueError`` while building ``what``) into a
    ConfigError, so a combination our own validation let through exits 2 instead of being retried as a crash:
    it would fail the same way on every restart."""
    try:
        yield
    except UserError:
        raise
    except (AssertionError, ValueError) as err:
        detail = str(err) or f"{type(err).__name__} at {_origin(err)}"
        raise ConfigError(f"megatron-core refused {what}: {detail}. The settings under model.* and parallel.* "
                          "passed our checks but not megatron-core's; change the one it names") from err


def _origin(err: BaseException) -> str:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
