"""One exception type for user mistakes, so the CLI can print a single actionable line and exit non-zero."""


class KVBenchError(Exception):
    """A problem the user can fix (bad name, bad value, missing file); the message says how."""
