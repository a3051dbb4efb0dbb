"""The job description language: parse and write JDL files (pure, no I/O)."""

from cbas.jdl.errors import JDLError
from cbas.jdl.model import JobDescription, parse_deadline, parse_duration
from cbas.jdl.parser import KEYS, parse
from cbas.jdl.writer import write

__all__ = ["JDLError", "JobDescription", "KEYS", "parse", "parse_deadline", "parse_duration", "write"]
