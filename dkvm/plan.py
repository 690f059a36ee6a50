"""The launch plan: what the container was asked to run and how to boot its VM.

Written by the runtime at `create` (from config.json), carried into the container in
one environment variable, and from there into the guest as a file. It is the only
thing the three sides share, so it is plain JSON.
"""
from dkvm import lightjson

PLAN_ENV = "DKVM_PLAN"

# field -> default (lists are copied per instance)
FIELDS = {
    "args": [], "env": [], "cwd": "/", "uid": 0, "gid": 0, "additional_gids": [],
    "terminal": False, "hostname": "", "domainname": "",
    "accel": "tcg",
    "cpus": 0,              # 0: as many as the container may use
    "memory_mib": 1024,
    "kernel": "debian", "kernel_append": "", "kernel_debug": False,
    "kernel_lib_modules": False,    # the guest kernel's modules at /lib/modules
    "dev_shm_size": 64 << 20,
    "tmpfs": [],            # [{"destination", "options"}]
    "sysctl": {},           # name -> value, as `--sysctl` and `--domainname` set them
    "winsize": [],          # [rows, cols] of the terminal at start, with -t
    "interfaces": [],       # the container's NICs, handed to the guest (net_container)
    "network_setup": [],    # the guest's steps to rebuild them (net_steps)
    "dns_upstream": [],     # the host's name servers, which Docker's embedded DNS uses
}


class Plan:
    """A plain class rather than a dataclass: the guest imports this under TCG, where
    every imported module costs."""

    def __init__(self, **values):
        unknown = set(values) - set(FIELDS)
        if unknown:
            raise TypeError(f"unknown plan fields: {sorted(unknown)}")
        for name, default in FIELDS.items():
            value = values.get(name, default)
            setattr(self, name, type(value)(value) if isinstance(value, (list, dict)) else value)

    def as_dict(self):
        return {name: getattr(self, name) for name in FIELDS}

    def __eq__(self, other):
        return isinstance(other, Plan) and self.as_dict() == other.as_dict()

    def __repr__(self):
        return f"Plan({self.as_dict()!r})"

    def to_json(self):
        return lightjson.dumps(self.as_dict())

    @classmethod
    def from_json(cls, text):
        return cls(**lightjson.loads(text))
