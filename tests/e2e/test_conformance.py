"""The OCI runtime-tools validation suite with runc and with dkvm-runtime, compared
check by check (tests/conformance/runtime_tools.py): dkvm passes every check runc
passes, but for what a VM runtime does differently by design (runtime_tools.BY_DESIGN;
the README's table says where and why)."""
import shutil

import pytest

from conformance import runtime_tools

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def suite(docker):                  # `docker`: dkvm is installed and registered
    if not shutil.which("go"):
        pytest.fail("Go is missing (golang-go): run ./setup.sh")
    build_dir = runtime_tools.build()
    return (runtime_tools.run_suite("runc", build_dir),
            runtime_tools.run_suite(runtime_tools.DKVM_RUNTIME, build_dir))


def test_the_whole_suite_ran_under_both_runtimes(suite):
    runc, dkvm = suite
    assert len(runc) == len(dkvm) >= 50
    assert sum(test.counts()[0] for test in runc.values()) > 2000
    assert sum(test.counts()[0] for test in dkvm.values()) > 1500


def test_dkvm_passes_what_runc_passes_but_for_what_a_vm_does_by_design(suite):
    runc, dkvm = suite
    differences = runtime_tools.compare(runc, dkvm)
    print(runtime_tools.table(runc, dkvm, differences))
    unexplained = {name: found for name, (_, found) in differences.items() if found}
    assert not unexplained
