"""The soak (bench/soak.py) at its default size: 200 cycles of run, exec, stop or
kill, and rm, 4 at a time, every fifth with a `docker restart`, busybox and Debian
in turn, every step bounded; any failure fails the test, with the
soak's report (and where it saved what diagnoses a hang) in the message."""
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"
SOAK_TIMEOUT = 2400         # about 700 s here; the soak bounds each step itself


def test_two_hundred_cycles_four_at_a_time(busybox_image, debian_image, tmp_path):
    out = subprocess.run([sys.executable, str(SOAK), "-n", "200", "-k", "4",
                          "--image", busybox_image, "--image", debian_image,
                          "--diagnostics", str(tmp_path / "diagnostics")],
                         capture_output=True, text=True, timeout=SOAK_TIMEOUT)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    assert "cycles: 200, 4 at a time" in report and "failures: 0" in report, report
    assert "restart n=  40" in report, report
    print(report)
