"""The launch plan: what the container was asked to run and how to boot its VM.

Written by the runtime at `create` (from config.json), carried into the container in
one environment variable, and from there into the guest as a file. It is the only
thing the three sides share, so it is plain JSON.
"""
import json
from dataclasses import asdict, dataclass, field

PLAN_ENV = "DKVM_PLAN"


@dataclass
class Plan:
    args: list
    env: list
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    additional_gids: list = field(default_factory=list)
    terminal: bool = False
    hostname: str = ""
    domainname: str = ""
    accel: str = "tcg"
    cpus: int = 0             # 0: as many as the container may use
    memory_mib: int = 1024
    kernel: str = "debian"
    kernel_append: str = ""
    kernel_debug: bool = False
    dev_shm_size: int = 64 << 20
    tmpfs: list = field(default_factory=list)   # [{"destination", "options"}]

    def to_json(self):
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text):
        return cls(**json.loads(text))
