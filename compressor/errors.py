"""The exception type users see (and MissingRecord, one kind of it): a message that says what was wrong, where, and what is allowed,
and `shorten`, which every message uses to quote a bad value without repeating all of it."""

from __future__ import annotations

import reprlib

# Longest quoted value in an error line: a bad value of megabytes must not make a line of megabytes.
QUOTE_LIMIT = 80

_quoter = reprlib.Repr()
_quoter.maxlevel = 3
_quoter.maxdict = _quoter.maxlist = _quoter.maxtuple = _quoter.maxset = 6
_quoter.maxstring = _quoter.maxother = QUOTE_LIMIT
_quoter.maxlong = 40


class CompressorError(Exception):
    """Bad input or an impossible request. The CLI prints it as one line and exits non-zero."""


class MissingRecord(CompressorError):
    """A stage's decide step found no record of what it must read in the analysis (the analysis was
    made for another recipe, or without that stage's measurement)."""

    def __init__(self, stage: str, what: str, where: str = "analysis",
                 command: str = "compress analyze --recipe RECIPE --model SOURCE --out DIR"):
        self.stage, self.what = stage, what
        super().__init__(f"{where}: no record of the {stage} stage ({what}); measure it: {command}")

    def naming(self, where: str, command: str) -> "MissingRecord":
        """The same error naming the analysis file and the exact command that measures the record."""
        return MissingRecord(self.stage, self.what, where, command)


def shorten(value, limit: int = QUOTE_LIMIT) -> str:
    """repr(value), cut to about `limit` characters; nested containers are summarized level by level,
    so even a YAML alias bomb (a structure with exponentially many shared references) is quoted in
    constant time. Newlines are escaped, so the result always fits on one line."""
    text = _quoter.repr(value)
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def one_line(text: str, limit: int = 300) -> str:
    """The first line of an exception's message, cut to `limit` characters (for wrapping errors
    raised by libraries, whose messages can span many lines or repeat a whole input)."""
    first = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."
