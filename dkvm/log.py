"""Who wrote a line. Every line DKVM writes for a person starts with one prefix that
names the role and the container: `dkvm[entrypoint 0123456789ab]: ...` (the host CLI,
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
    return prefix() + message


def warn(message):
    """One line on stderr: the container's log (`docker logs`) on the container side,
    the kernel log in the guest, the terminal for the host CLI."""
    print(line(message), file=sys.stderr, flush=True)
