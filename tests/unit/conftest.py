import pytest

from unitutil import FIXTURE_NAMES, load_config


@pytest.fixture(params=FIXTURE_NAMES)
def any_config(request):
    return request.param, load_config(request.param)


@pytest.fixture(autouse=True)
def log_context():
    """Log lines name the role and container; each test starts with neither set and
    may set them (dkvm.log keeps them per process)."""
    from dkvm import log
    log.set_role("")
    log.set_container("")
    yield log
    log.set_role("")
    log.set_container("")
