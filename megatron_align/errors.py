"""Errors a user can act on. The CLI prints them without a traceback and exits 2."""


class UserError(Exception):
    """A problem the user can fix (bad config value, missing file, wrong layout)."""


class ConfigError(UserError, ValueError):
    """Invalid configuration; the message names the key (e.g. ``parallel.tensor``) and what to do."""
