"""lightjson reads and writes what the json package does, for the data DKVM sends."""
import json
import subprocess
import sys

import pytest

from dkvm import lightjson
from unitutil import REPO

SAMPLES = [
    {"args": ["sh", "-c", "echo \"hi\"\n\t\\ é ✓ \U0001F600"], "env": ["A=1"], "uid": 0,
     "tty": False, "cwd": None, "ratio": 2.5, "nested": {"list": [[], {}, -7]}},
    [], {}, "", 0, -1, 1 << 70, True, None,
]


@pytest.mark.parametrize("value", SAMPLES)
def test_round_trips_and_agrees_with_json(value):
    text = lightjson.dumps(value)
    assert json.loads(text) == value
    assert lightjson.loads(text) == value
    assert lightjson.loads(json.dumps(value, indent=2).encode()) == value


@pytest.mark.parametrize("text", ["", "{", '{"a": 1} x', "nope", '{"a": }', "[1,]"])
def test_malformed_text_is_a_value_error(text):
    with pytest.raises(ValueError):
        lightjson.loads(text)


def test_what_json_cannot_write_is_refused():
    with pytest.raises(TypeError, match="not JSON data: set"):
        lightjson.dumps({"a": {1, 2}})


def test_the_guest_roles_import_neither_json_nor_re_nor_enum():
    """The point of it: each of these costs the guest's boot under TCG."""
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c",
         f"import sys; sys.path.insert(0, {str(REPO)!r}); import dkvm.__main__, "
         "dkvm.roles.vm_init; print(sorted({'json', 're', 'enum', 'socket', 'signal', "
         "'importlib', 'typing'} & set(sys.modules)))"],
        capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
