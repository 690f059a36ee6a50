"""JSON for the control channel and the plan without the json package, whose import
pulls in re and enum: a few tenths of a second of every guest boot under TCG. The C
accelerator behind the json package does the work."""
from _json import encode_basestring_ascii, make_scanner


class _Options:
    """What the C scanner reads from json.JSONDecoder."""
    strict = True
    object_hook = object_pairs_hook = None
    parse_float, parse_int, parse_constant = float, int, float


_scan = make_scanner(_Options())
_WHITESPACE = " \t\n\r"


def dumps(value):
    """Compact JSON text of plain data (dict, list, str, int, float, bool, None)."""
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return repr(int(value))         # an IntEnum's repr is its name
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{encode_basestring_ascii(str(key))}:{dumps(item)}"
                              for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(item) for item in value) + "]"
    raise TypeError(f"not JSON data: {type(value).__name__}")


def loads(text):
    """The value `text` holds; ValueError for anything that is not one JSON value
    (bytes that are not UTF-8 included)."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode()
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration as stop:
        raise ValueError(f"not JSON at offset {stop.value}") from None
    except (SystemError, RecursionError) as err:
        # Where json.decoder was never imported (the guest), the scanner cannot make
        # its JSONDecodeError and fails with SystemError instead; deep nesting recurses.
        raise ValueError(f"not JSON: {type(err).__name__}") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"extra data after JSON at offset {end}")
    return value
