"""Who wrote a line. Every line DKVM writes for a person starts with one prefix that
names the role and the container: `dkvm[ctr-entrypoint 0123456789ab]: ...` (the host CLI,
which serves no container, writes `dkvm: ...`). A message never carries a prefix of
its own; `line` adds the one."""
import sys

CONTAINER_ID_CHARS = 12
_context = {"role": "", "container": ""}


def set_role(role):
    _context["role"] = role


def set_container(container_id):
    _context["container"] = (container_id or "")[:CONTAINER_ID_CHARS]


def prefix():
    who = " ".join(part for part in (_context["role"], _context["container"]) if part)
    return f"dkvm[{who}]: " if who else "dkvm: "


def line(message):
    return prefix() + printable(message)


def printable(text):
    """`text` as visible characters only: an error line quotes the guest's console,
    QEMU's and virtiofsd's logs and names from the image, any of which can hold
    escape sequences that retitle the user's terminal, erase the line or draw a fake
    "all good" over it (in `docker logs` too). Each control character (C0, DEL, C1,
    ESC) and other invisible one (bidi overrides, line separators) is written out as
    its escape, `\\x1b`; plain text passes as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def warn(message):
    """One line on stderr: the container's log (`docker logs`) on the container side,
    the kernel log in the guest, the terminal for the host CLI."""
    print(line(message), file=sys.stderr, flush=True)
