import pytest

from unitutil import FIXTURE_NAMES, load_config


@pytest.fixture(params=FIXTURE_NAMES)
def any_config(request):
    return request.param, load_config(request.param)
