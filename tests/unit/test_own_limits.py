"""The limits the container side hands the guest for the workload and each exec
(container.own_limits): what runc's process would have had."""
import resource

from dkvm.container.own_limits import own_rlimits
from dkvm.kernel_names import RLIM_INFINITY


def test_the_workload_keeps_the_engines_descriptor_limit():
    """The container side's RLIMIT_NOFILE is raised for virtiofsd (host.container_side);
    the workload's default is the engine's, which create recorded."""
    limits = {limit.type: limit for limit in own_rlimits([1024, 20000])}
    assert (limits["RLIMIT_NOFILE"].soft, limits["RLIMIT_NOFILE"].hard) == (1024, 20000)
    assert limits["RLIMIT_STACK"].soft in (resource.getrlimit(resource.RLIMIT_STACK)[0],
                                           RLIM_INFINITY)
    own = {limit.type: limit for limit in own_rlimits()}["RLIMIT_NOFILE"]
    assert [own.soft, own.hard] == list(resource.getrlimit(resource.RLIMIT_NOFILE))
