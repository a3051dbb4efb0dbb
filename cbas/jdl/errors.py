"""The one error type of the JDL package: it knows where in the file things went wrong."""

from __future__ import annotations


class JDLError(ValueError):
    """A JDL file that cannot be read; `line` and `column` are 1-based."""

    def __init__(self, message: str, line: int, column: int, filename: str | None = None) -> None:
        self.message = message
        self.line = line
        self.column = column
        self.filename = filename
        where = f"{filename or '<jdl>'}:{line}:{column}"
        super().__init__(f"{where}: {message}")
