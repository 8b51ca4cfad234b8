"""One exception type for user mistakes, so the CLI can print a single actionable line and exit non-zero."""


class KVBenchError(Exception):
    """A problem the user can fix (bad name, bad value, missing file); the message says how."""


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message (its type's name when it has none): libraries' errors
    carry tables and advice over many lines, and a one-line error quotes only their gist."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
