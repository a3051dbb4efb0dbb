from datetime import datetime, timedelta, timezone

import pytest

from cbas.jdl import JDLError, parse, parse_deadline

FULL = r'''
// the original system's example, with our extensions
[
  Executable = "counter.sh";
  Arguments = "100 \"two words\" tab\there";   # escapes inside strings
  Prologue = {"install.sh", "setup.sh"};
  InputSandbox = {"input.txt", "data/big.bin",};
  OutputSandbox = {"output.txt"};
  CheckpointStrategy = dmtcp;
  CheckpointInterval = 900
  Deadline = "2026-12-01T18:00:00Z";
  Runtime = "36h";
  MaxPrice = 0.25;
  InstanceTypes = {"c5.large", "m5.large"};
  /* two ways to write an environment */
  Environment = {OMP_NUM_THREADS = "4", "JAVA_OPTS=-Xmx2g"};
  name = "my job";
  ValidateCheckpoint = TRUE;
]
'''


def test_parses_every_key() -> None:
    job = parse(FULL, "full.jdl")
    assert job.executable == "counter.sh"
    assert job.arguments == '100 "two words" tab\there'
    assert job.prologue == ("install.sh", "setup.sh")
    assert job.input_sandbox == ("input.txt", "data/big.bin")
    assert job.output_sandbox == ("output.txt",)
    assert job.checkpoint_strategy == "dmtcp"
    assert job.checkpoint_interval == 900
    assert job.deadline == "2026-12-01T18:00:00Z"
    assert job.runtime_hours() == 36.0
    assert job.max_price == 0.25
    assert job.instance_types == ("c5.large", "m5.large")
    assert job.environment == {"OMP_NUM_THREADS": "4", "JAVA_OPTS": "-Xmx2g"}
    assert job.name == "my job"
    assert job.validate_checkpoint is True


def test_defaults_and_single_values_as_lists() -> None:
    job = parse('Executable = "/bin/true"\nInputSandbox = "a.txt"')
    assert job.input_sandbox == ("a.txt",)
    assert job.checkpoint_strategy == "directory"
    assert job.checkpoint_interval == 600
    assert job.environment == {}


@pytest.mark.parametrize(
    ("text", "line", "column", "fragment"),
    [
        ('Executable = "a"\nExectuable = "b"', 2, 1, "did you mean Executable?"),
        ('Executable = "a";\nFrobnicate = 1', 2, 1, "known keys"),
        ('Executable = "a";\nCheckpointInterval = "soon"', 2, 22, "whole number of seconds"),
        ('Executable = "a";\nCheckpointInterval = 1.5', 2, 22, "whole number of seconds"),
        ('Executable = "a";\nMaxPrice = "cheap"', 2, 12, "expects a number"),
        ('Executable = "a";\nCheckpointStrategy = "magic"', 2, 22, "CheckpointStrategy"),
        ('Executable = "a";\nDeadline = "soon"', 2, 12, "neither an ISO time"),
        ('Executable = "a";\nRuntime = "2026-01-01T00:00:00Z"', 2, 11, "is not a duration"),
        ('Executable = "a";\nMaxPrice = -1', 2, 12, "MaxPrice"),
        ('Executable = "a', 1, 14, "never closed"),
        ('Executable = "a\\q"', 1, 16, "unknown escape"),
        ('Executable "a"', 1, 12, "expected '=' after Executable"),
        ('Executable = ;', 1, 14, "expected a value"),
        ('InputSandbox = {"a" "b"}', 1, 21, "expected ',' or '}'"),
        ('Executable = "a"; Executable = "b"', 1, 19, "given twice"),
        ('Arguments = "x"', 1, 1, "missing required key Executable"),
        ('Executable = "a" /* open', 1, 18, "never closed"),
        ('Executable = "a"; Environment = {"NOEQUALS"}', 1, 34, "has no '='"),
        ('Executable = "a"; Environment = {1BAD = "x"}', 1, 34, "unexpected character '1'"),
        ('Executable = "a"; Environment = {A = "1", A = "2"}', 1, 33, "sets A twice"),
        ('Executable = "a"; Arguments = {"x"}', 1, 31, "single value"),
        ('[ Executable = "a"', 1, 19, "']'"),
        ('Executable = "a"; ValidateCheckpoint = 1', 1, 40, "expects true or false"),
        ('Executable = "a" @', 1, 18, "unexpected character"),
    ],
)
def test_errors_name_file_line_column_and_what_was_expected(text: str, line: int, column: int, fragment: str) -> None:
    with pytest.raises(JDLError) as caught:
        parse(text, "job.jdl")
    error = caught.value
    assert (error.line, error.column) == (line, column), str(error)
    assert fragment in str(error)
    assert str(error).startswith(f"job.jdl:{line}:{column}: ")


def test_keys_are_case_insensitive() -> None:
    assert parse('EXECUTABLE = "a"; checkpointinterval = 5').checkpoint_interval == 5


def test_deadline_as_duration_or_time() -> None:
    submitted = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert parse_deadline("1d 12h", submitted) == submitted + timedelta(hours=36)
    assert parse_deadline("90m", submitted) == submitted + timedelta(minutes=90)
    assert parse_deadline("2026-01-02T00:00:00", submitted) == datetime(2026, 1, 2, tzinfo=timezone.utc)


def test_referenced_files_are_prologue_then_inputs() -> None:
    job = parse('Executable = "a"; Prologue = {"p.sh"}; InputSandbox = {"i.txt"}')
    assert job.referenced_files() == ["p.sh", "i.txt"]
