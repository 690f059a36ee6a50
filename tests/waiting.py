"""The one bounded wait of the test suite: poll until a condition holds or the time
is up. Nothing in the tests sleeps in place of a condition, and nothing waits
without a bound."""
import time


def poll(read, done, timeout, interval=0.2):
    """Call `read()` until `done(value)` or `timeout` seconds; the last value, for the
    caller to assert on (so that a failure shows what was seen)."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_until(condition, what, timeout=120, interval=0.2):
    """The first truthy value of `condition()`; AssertionError naming `what` and the
    last value seen if none comes within `timeout` seconds."""
    value = poll(condition, bool, timeout, interval)
    if not value:
        raise AssertionError(f"timed out after {timeout}s waiting for {what} "
                             f"(last seen: {value!r})")
    return value


def wait_until_steady(read, what, settle=1.0, timeout=60, interval=0.2):
    """`read()` once it has given the same value for `settle` seconds (what was in
    flight has landed), bounded by `timeout`."""
    state = {"value": read(), "since": time.monotonic()}

    def steady():
        value = read()
        if value != state["value"]:
            state.update(value=value, since=time.monotonic())
        return time.monotonic() - state["since"] >= settle
    wait_until(steady, what, timeout, interval)
    return state["value"]
