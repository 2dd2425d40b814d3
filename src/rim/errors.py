"""User-facing errors: the CLI prints them as one line and exits with their `exit_code`.

Exit codes: 2 bad input (data, config, paths, a refused run folder); 74 an OS error while
writing (full disk, read-only folder); 75 training stopped by SIGTERM/SIGINT after saving a
checkpoint (requeue with `rim train --resume RUN`); 130 a second Ctrl-C (stopped at once).
"""

EXIT_USAGE = 2
EXIT_IO = 74  # sysexits EX_IOERR
EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: try again (resume)
EXIT_INTERRUPTED = 130


class RimError(Exception):
    """Bad input from the user (data, config, paths). Message is one line, naming the place."""

    exit_code = EXIT_USAGE


class DataError(RimError):
    """A malformed data record; the message starts with `file:line:`."""


class ConfigError(RimError):
    """A bad config key or value; the message names the key."""


class StorageError(RimError):
    """Writing failed (full disk, permissions): names the path and the OS error."""

    exit_code = EXIT_IO


class Preempted(RimError):
    """Training stopped cleanly on a signal, after writing a checkpoint."""

    exit_code = EXIT_PREEMPTED
