"""For every run: each test's time (setup, call and teardown) is written, slowest
first, to build/test-durations.txt, where a developer looks to choose what to mark
slow, and the run's tier is printed with it."""
from pathlib import Path

DURATIONS = Path(__file__).resolve().parents[1] / "build" / "test-durations.txt"
_times = {}


def pytest_runtest_logreport(report):
    _times[report.nodeid] = _times.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    if not _times:
        return
    slow = {item.nodeid for item in session.items if item.get_closest_marker("slow")}
    lines = [f"{seconds:8.1f}s  {'slow' if nodeid in slow else 'fast'}  {nodeid}"
             for nodeid, seconds in sorted(_times.items(), key=lambda kv: -kv[1])]
    total = sum(_times.values())
    DURATIONS.parent.mkdir(exist_ok=True)
    DURATIONS.write_text(f"# {len(_times)} tests, {total:.0f} s in all "
                         f"(pytest {' '.join(session.config.invocation_params.args)})\n"
                         + "\n".join(lines) + "\n")
