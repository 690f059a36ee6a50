"""An integration test of one rule across log, container/processes and guest/process
(every place untrusted text is turned into an error line), so that none is missed.
What the guest, QEMU's and virtiofsd's logs or the image say reaches the user's
terminal and `docker logs` only as visible text: an escape sequence quoted in an
error line would retitle the terminal, erase the line or draw over it."""
import subprocess
import sys

import pytest

from dkvm import log
from dkvm.container import processes
from dkvm.container.processes import Child, tail

SPOOF = "\x1b]0;pwned\x07\x1b[2K\r\x1b[32mall good\x1b[0m\x9b2J\x7f\u202e\x00"


def visible(text):
    return text.isprintable() and "\x1b" not in text


def test_every_control_character_is_written_out_as_its_escape():
    assert log.printable(SPOOF) == ("\\x1b]0;pwned\\x07\\x1b[2K\\r\\x1b[32mall good\\x1b[0m"
                                    "\\x9b2J\\x7f\\u202e\\x00")
    for code in list(range(0x20)) + list(range(0x7f, 0xa0)):
        assert visible(log.printable(f"a{chr(code)}b"))


@pytest.mark.parametrize("text", ["plain text", "é ü 漢字 tabs\tare escaped", ""])
def test_plain_text_passes_and_the_rest_stays_readable(text):
    assert log.printable(text) == text.replace("\t", "\\t")


def test_a_line_dkvm_writes_is_one_line_of_visible_text(capsys):
    """DkvmError messages, warnings: whatever they quote (an exec's path from the image,
    the guest's error) stays one visible line."""
    log.warn(f"exec: {SPOOF}\nsecond line")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and visible(err.rstrip("\n"))
    assert "\\x1b]0;pwned\\x07" in err and "\\nsecond line" in err


def test_a_logs_tail_is_visible_text(tmp_path):
    path = tmp_path / "console.log"
    path.write_bytes(b"[    1.0] boot\r\n" + SPOOF.encode("utf-8", "surrogatepass")
                     + b"\n\xff\xfe raw bytes\n")
    text = tail(str(path))
    assert visible(text)
    assert "\\x1b[32mall good" in text and "boot | " in text


def test_a_dead_childs_story_quotes_its_log_as_visible_text(tmp_path, monkeypatch):
    """QEMU's log (the guest can make QEMU write) and the console tail, as the error
    line has them."""
    qemu_log, console = tmp_path / "qemu.log", tmp_path / "console.log"
    qemu_log.write_text(f"qemu: {SPOOF}\n")
    console.write_text(f"Kernel panic - {SPOOF}\n")
    monkeypatch.setattr(processes.paths, "CONSOLE_LOG", str(console))
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    proc.wait(timeout=30)
    story = Child("QEMU", proc, str(qemu_log)).describe_exit() + processes.console_tail()
    assert visible(story)
    assert story.startswith(" (QEMU exit status 1: qemu: \\x1b]0;pwned")
    assert "(guest console: Kernel panic - \\x1b]0;pwned" in story


def test_a_start_failure_in_the_guest_names_the_images_file_as_visible_text(capfd):
    """`docker run IMAGE COMMAND` with escapes in COMMAND: the guest's words name it."""
    from dkvm.guest.process import report_exec_failure, report_run_failure
    report_run_failure(f'exec: "{SPOOF}": no such file or directory')
    report_exec_failure(f'exec: "{SPOOF}": no such file or directory')
    out, err = capfd.readouterr()
    assert visible(err.rstrip("\n")) and err.startswith("dkvm: unable to start")
    assert visible(out.rstrip("\r\n")) and "\\x1b]0;pwned" in out
