from hypothesis import given, settings
from hypothesis import strategies as st

from cbas.jdl import JobDescription, parse, write

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
nonempty = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)

jobs = st.builds(
    JobDescription,
    executable=nonempty,
    arguments=text,
    name=st.none() | text,
    prologue=st.lists(nonempty, max_size=3).map(tuple),
    input_sandbox=st.lists(nonempty, max_size=3).map(tuple),
    output_sandbox=st.lists(nonempty, max_size=3).map(tuple),
    checkpoint_strategy=st.sampled_from(["dmtcp", "directory", "signal", "volume"]),
    checkpoint_interval=st.integers(min_value=1, max_value=10**7),
    deadline=st.none() | st.sampled_from(["36h", "2d 4h", "90m", "2026-12-01T18:00:00Z", "2027-01-01T00:00:00+02:00"]),
    runtime=st.none() | st.sampled_from(["12h", "1d 6h", "45s", "2.5h"]),
    max_price=st.none() | st.floats(min_value=1e-6, max_value=1e6, allow_nan=False),
    instance_types=st.lists(nonempty, max_size=3).map(tuple),
    environment=st.dictionaries(names, text, max_size=3),
    validate_checkpoint=st.booleans(),
)


@settings(max_examples=300)
@given(jobs)
def test_write_then_parse_gives_the_same_job(job: JobDescription) -> None:
    written = write(job)
    assert parse(written) == job
    assert write(parse(written)) == written  # and writing is stable
