"""The guest kernel's command line (kernel_args): what it composes from the plan, and
the kernel's own parameters it lists, checked against Linux 6.1's."""
import re
import subprocess

import pytest

from unitutil import REPO
from dkvm.kernel_args import BOOT_PARAMETERS, KERNEL_PARAMETERS, compose


def test_compose_passes_no_refused_word_on():
    """The container side composes the line from the plan: what create refuses never
    reaches the kernel from there either."""
    line = compose([], False, "loglevel=4 init=/x LD_PRELOAD=/y -- /bin/sh")
    assert line[-1] == "loglevel=4"
    assert not [w for w in line if w.startswith(("init=", "LD_PRELOAD", "--", "/bin"))]


def test_the_curated_parameters_are_the_kernels():
    """Each name is in Linux 6.1's kernel-parameters.txt or a __setup() of its source,
    where the build has unpacked it."""
    src = sorted((REPO / "build" / "kernel-src").glob("linux-source-6.1*"))
    if not src:
        pytest.skip("no unpacked linux-source-6.1 in build/")
    doc = (src[-1] / "Documentation/admin-guide/kernel-parameters.txt").read_text()
    documented = {m.group(1).replace("-", "_") for m in
                  re.finditer(r"^\t([A-Za-z0-9_.-]+)(?=[=\[\s]|$)", doc, re.M)}
    missing = [n for n in KERNEL_PARAMETERS | BOOT_PARAMETERS if n not in documented]
    setups = set()
    for name in missing:
        out = subprocess.run(
            ["grep", "-rqE", rf'(__setup|early_param)\("{name}=?"', str(src[-1] / "kernel"),
             str(src[-1] / "mm"), str(src[-1] / "init"), str(src[-1] / "block")])
        if out.returncode == 0:
            setups.add(name)
    assert sorted(set(missing) - setups) == []
