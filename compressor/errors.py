"""The one exception type users see: a message that says what was wrong, where, and what is allowed."""


class CompressorError(Exception):
    """Bad input or an impossible request. The CLI prints it as one line and exits non-zero."""
