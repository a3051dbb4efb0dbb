from tests.integration.conftest import cluster  # noqa: F401 (the same real installation fixture)
