"""The container side's own resource limits, for the workload and every exec: what
runc's process would have had where config.json sets none."""
from dkvm.kernel_names import RLIM_INFINITY, RLIMITS
from dkvm.schema import Rlimit


def own_rlimits(engine_nofile=()):
    """Ours, but RLIMIT_NOFILE the engine's: ours is raised for virtiofsd (rewrite)."""
    import resource

    def unsigned(value):            # RLIM_INFINITY is -1 here, all ones in OCI
        return RLIM_INFINITY if value == resource.RLIM_INFINITY else value
    limits = []
    for number, name in enumerate(RLIMITS):
        soft, hard = resource.getrlimit(number)
        soft, hard = unsigned(soft), unsigned(hard)
        if name == "RLIMIT_NOFILE" and len(engine_nofile) == 2:
            soft, hard = engine_nofile
        limits.append(Rlimit(type=name, soft=soft, hard=hard))
    return limits
