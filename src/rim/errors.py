"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class RimError(Exception):
    """Bad input from the user (data, config, paths). Message is one line, naming the place."""


class DataError(RimError):
    """A malformed data record; the message starts with `file:line:`."""


class ConfigError(RimError):
    """A bad config key or value; the message names the key."""
