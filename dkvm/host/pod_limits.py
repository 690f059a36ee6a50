"""A pod's VM is sized by its pod's limits. containerd 1.6 gives a pod's sandbox no
resources of its own; the kubelet puts the pod's limits (its containers' limits, plus
the RuntimeClass's overhead) on the pod's cgroup, which is the sandbox's cgroup's
parent. The sandbox takes them as its own where its config has none: runc sets them
on its cgroup, and the VM is sized within them (vm_size), as for `docker run -m`.

Only the engine's config names the cgroup (CRI's, proven by host.pods), and only the
host's cgroup tree is read."""
import os
import posixpath

CGROUP_ROOT = "/sys/fs/cgroup"
NO_LIMIT = 1 << 62              # cgroup v1's "unlimited" is about 2**63 bytes


def pod_cgroup(cgroups_path):
    """The pod's cgroup (the sandbox's cgroup's parent) as a path in a hierarchy, ""
    when the sandbox's path says none. The cgroupfs driver's paths are paths; the
    systemd driver's are `slice:prefix:name`, the slice's path made of its name."""
    if not isinstance(cgroups_path, str) or not cgroups_path:
        return ""
    if ":" in cgroups_path:
        return slice_path(cgroups_path.split(":", 1)[0])
    if not cgroups_path.startswith("/") or ".." in cgroups_path.split("/"):
        return ""
    parent = posixpath.dirname(posixpath.normpath(cgroups_path))
    return "" if parent == "/" else parent


def slice_path(name):
    """systemd's path of a slice: `a-b.slice` is /a.slice/a-b.slice."""
    if not name.endswith(".slice") or "/" in name or name == "-.slice":
        return ""
    parts = name[:-len(".slice")].split("-")
    if "" in parts:
        return ""
    return "".join(f"/{'-'.join(parts[:n])}.slice" for n in range(1, len(parts) + 1))


def read_pod_limits(cgroups_path, root=CGROUP_ROOT):
    """The pod's memory limit and CPU quota as OCI resources ({} where it has none):
    from cgroup v1's memory and cpu hierarchies, or the v2 tree."""
    parent = pod_cgroup(cgroups_path)
    if not parent:
        return {}
    resources = {}
    if os.path.isdir(os.path.join(root, "memory")):         # v1
        memory = read_number(f"{root}/memory{parent}/memory.limit_in_bytes")
        quota = read_number(f"{root}/cpu{parent}/cpu.cfs_quota_us")
        period = read_number(f"{root}/cpu{parent}/cpu.cfs_period_us")
    else:
        memory = read_number(f"{root}{parent}/memory.max")
        quota, period = (read_text(f"{root}{parent}/cpu.max").split() + ["", ""])[:2]
        quota, period = as_number(quota), as_number(period)
    if 0 < memory < NO_LIMIT:
        resources["memory"] = {"limit": memory}
    if quota > 0 and period > 0:
        resources["cpu"] = {"quota": quota, "period": period}
    return resources


def with_pod_limits(config, limits):
    """`config` whose resources take the pod's `limits` where it sets none."""
    if not limits:
        return config
    config = dict(config)
    linux = config["linux"] = dict(config.get("linux") or {})
    resources = linux["resources"] = dict(linux.get("resources") or {})
    if "memory" in limits and not (resources.get("memory") or {}).get("limit"):
        resources["memory"] = dict(resources.get("memory") or {}, **limits["memory"])
    if "cpu" in limits and not (resources.get("cpu") or {}).get("quota"):
        resources["cpu"] = dict(resources.get("cpu") or {}, **limits["cpu"])
    return config


def read_text(path):
    try:
        with open(path) as f:
            return f.read(64)
    except OSError:
        return ""


def read_number(path):
    return as_number(read_text(path).strip())


def as_number(text):
    try:
        return int(text)
    except ValueError:
        return 0                # "max" (v2): no limit, as v1's quota of -1 is none
