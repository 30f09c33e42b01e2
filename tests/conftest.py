import os
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


# `make test` installs every package the suite uses, so there (GEOBIND_STRICT_SKIPS=1, set by
# the Makefile) a test skipped for a missing package is a failure: the suite would otherwise
# pass with whole files untested. A GPU and Debian's Chromium (which CI installs on a best-
# effort basis) may be absent.
ALLOWED_SKIPS = ("needs CUDA", "no Chromium at")


def _strict_skip(report) -> None:
    if os.environ.get("GEOBIND_STRICT_SKIPS") != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    if not any(ok in reason for ok in ALLOWED_SKIPS):
        report.outcome = "failed"
        report.longrepr = f"skipped under GEOBIND_STRICT_SKIPS=1 (make test installs what it needs): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _strict_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _strict_skip(outcome.get_result())
