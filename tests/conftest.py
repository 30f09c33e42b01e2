import sys
from pathlib import Path

import pytest

import geobind  # noqa: F401  (first: it configures pyarrow's allocator before pandas loads it)

sys.path.insert(0, str(Path(__file__).parent))

from fixtures import make_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A seeded tiny paired dataset (48 places, four classes), built once per session."""
    return make_dataset(tmp_path_factory.mktemp("tiny_data"))
