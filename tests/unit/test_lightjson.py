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


MALFORMED = ["", "{", '{"a": 1} x', "nope", '{"a": }', "[1,]", '"abc', '{"a":1', '"\x01"',
             '{"a" 1}', "[" * 100000, b"\xff"]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_text_is_a_value_error(text):
    with pytest.raises(ValueError):
        lightjson.loads(text)


def test_malformed_text_is_a_value_error_where_json_was_never_imported():
    """As in the guest: without json.decoder the C scanner fails with SystemError."""
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c",
         f"import sys; sys.path.insert(0, {str(REPO)!r}); from dkvm import lightjson\n"
         f"for text in {MALFORMED!r}:\n"
         "    try: lightjson.loads(text)\n"
         "    except ValueError: print('ValueError')\n"
         "    except BaseException as err: print(type(err).__name__)\n"
         "print('json' in sys.modules)"],
        capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["ValueError"] * len(MALFORMED) + ["False"], out.stderr


def test_what_json_cannot_write_is_refused():
    with pytest.raises(TypeError, match="not JSON data: set"):
        lightjson.dumps({"a": {1, 2}})
