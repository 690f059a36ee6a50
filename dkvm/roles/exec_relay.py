"""dkvm-exec: relays one `docker exec` into the guest. Until the control channel
carries exec requests, it refuses, so that an exec never silently runs in the
container instead of the VM."""
from dkvm.errors import DkvmError


def main(argv):
    raise DkvmError("docker exec into a DKVM container is not supported yet "
                    "(it would run outside the VM)", exit_code=126)
