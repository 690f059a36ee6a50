"""The one schema every side reads: the launch plan, the process spec (the workload's
and each `docker exec`'s), interfaces and routes, network changes.

The plan is made by the runtime at `create` from config.json, completed by the
container's entrypoint with what only it can see (its network interfaces, its
terminal), and read by the guest's init. Each plan field says which of the two sets
it (`set_by`); nothing else writes it.

Records are plain classes (dataclasses cost the guest an import under TCG). Built
from code they trust their arguments; `from_dict` checks what comes from elsewhere
(the plan from its file, a frame from the guest): each field's type, nested
records, and any range, raising SchemaError (a ValueError) that names the field.
"""
from dkvm import lightjson
from dkvm.kernel_names import CAPABILITY_NUMBERS, RLIM_INFINITY, RLIMIT_NUMBERS
from dkvm.options import IMAGE_KERNEL, OPTIONS

CREATE, ENTRYPOINT = "create", "entrypoint"
MAX_ID = (1 << 32) - 1


class SchemaError(ValueError):
    pass


class ListOf:
    def __init__(self, item):
        self.item = item


class MapOf:
    """A JSON object with string keys."""

    def __init__(self, item):
        self.item = item


class Field:
    __slots__ = ("kind", "default", "check", "set_by", "required")

    def __init__(self, kind, default, check=None, set_by=CREATE, required=False):
        """`check`: a range the value must be in; `required`: `from_dict` refuses a
        dict without it (a frame's one field: a default would hide its absence)."""
        self.kind, self.default, self.check, self.set_by = kind, default, check, set_by
        self.required = required

    def fresh_default(self):
        default = self.default
        if isinstance(default, type):           # a record: a new one each time
            return default()
        return type(default)(default) if isinstance(default, (list, dict)) else default


ROOT_PROPAGATIONS = ("shared", "rshared", "slave", "rslave", "private", "rprivate",
                     "unbindable", "runbindable")


def in_range(low, high):
    return lambda value: low <= value <= high


def hex_text(most):
    return lambda value: len(value) <= most and all(c in "0123456789abcdef" for c in value)


def one_of(*values):
    return lambda value: value in values


def all_in(known):
    return lambda values: all(value in known for value in values)


def convert(kind, value, where):
    """`value` (decoded JSON) checked against `kind`; records come out as records."""
    if kind is bool or kind is str:
        if not isinstance(value, kind):
            raise SchemaError(f"{where}: expected {kind.__name__}, got {type(value).__name__}")
        return value
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise SchemaError(f"{where}: expected int, got {type(value).__name__}")
        return value
    if isinstance(kind, ListOf):
        if not isinstance(value, list):
            raise SchemaError(f"{where}: expected a list, got {type(value).__name__}")
        return [convert(kind.item, item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(kind, MapOf):
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: expected an object, got {type(value).__name__}")
        return {key: convert(kind.item, item, f"{where}.{key}") for key, item in value.items()}
    return kind.from_dict(value, where)


def plain(value):
    """Records as dicts, all the way down: what JSON carries."""
    if isinstance(value, Record):
        return value.as_dict()
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


class Record:
    FIELDS = {}

    def __init__(self, **values):
        unknown = set(values) - set(self.FIELDS)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown fields {sorted(unknown)}")
        for name, field in self.FIELDS.items():
            setattr(self, name, values[name] if name in values else field.fresh_default())

    @classmethod
    def from_dict(cls, data, where=None):
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise SchemaError(f"{where}: expected an object, got {type(data).__name__}")
        missing = [name for name, field in cls.FIELDS.items()
                   if field.required and name not in data]
        if missing:
            raise SchemaError(f"{where}: missing {', '.join(missing)}")
        values = {}
        for name, value in data.items():
            field = cls.FIELDS.get(name)
            if field is None:
                raise SchemaError(f"{where}: unknown field {name!r}")
            value = convert(field.kind, value, f"{where}.{name}")
            if field.check is not None and not field.check(value):
                raise SchemaError(f"{where}.{name}: {value!r} is out of range")
            values[name] = value
        return cls(**values)

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(lightjson.loads(text))

    def as_dict(self):
        return {name: plain(getattr(self, name)) for name in self.FIELDS}

    def to_json(self):
        return lightjson.dumps(self.as_dict())

    def __eq__(self, other):
        return type(other) is type(self) and self.as_dict() == other.as_dict()

    def __repr__(self):
        return f"{type(self).__name__}({self.as_dict()!r})"


# --- processes -------------------------------------------------------------------------

class Rlimit(Record):
    """One resource limit, as OCI writes it (RLIMIT_NOFILE, ...)."""
    FIELDS = {"type": Field(str, "RLIMIT_NOFILE", one_of(*RLIMIT_NUMBERS)),
              "soft": Field(int, 0, in_range(0, RLIM_INFINITY)),
              "hard": Field(int, 0, in_range(0, RLIM_INFINITY))}


CAPABILITY_SETS = ("bounding", "effective", "permitted", "inheritable", "ambient")
known_capabilities = all_in(CAPABILITY_NUMBERS)


class Capabilities(Record):
    """The process's capabilities in the guest. By default the VM's: full root, minus
    `drop` (what the user dropped from the engine's default set, and what the VM holds
    back unless asked for). With `exact` (`--cap-drop ALL`): runc's five sets as
    given."""
    FIELDS = {"exact": Field(bool, False),
              "drop": Field(ListOf(str), [], known_capabilities),
              **{name: Field(ListOf(str), [], known_capabilities) for name in CAPABILITY_SETS}}


class Process(Record):
    """What runc would have run: the workload, or one `docker exec`."""
    FIELDS = {
        "args": Field(ListOf(str), []),
        "env": Field(ListOf(str), []),              # without DKVM_* settings
        "cwd": Field(str, "/"),
        "uid": Field(int, 0, in_range(0, MAX_ID)),
        "gid": Field(int, 0, in_range(0, MAX_ID)),
        "additional_gids": Field(ListOf(int), []),
        "terminal": Field(bool, False),
        "rlimits": Field(ListOf(Rlimit), []),        # `--ulimit`
        "no_new_privileges": Field(bool, False),
        "capabilities": Field(Capabilities, Capabilities),
        "oom_score_adj": Field(int, 0, in_range(-1000, 1000)),
    }


# a pod member's container id as the guest knows it ("" in ExecStart: the workload)
def container_id_text(text):
    return len(text) <= 128 and all(c.isascii() and (c.isalnum() or c in "-_.") for c in text)


class ExecStart(Record):
    """EXEC_START: one `docker exec`, and its terminal's size at start (with -t);
    `member`: into that member of the pod (host.pods), not the VM's workload; `port`:
    not a process but a connection to the guest's localhost:port, a pod's port-forward
    (container.port_forward)."""
    FIELDS = {"process": Field(Process, Process), "winsize": Field(ListOf(int), []),
              "member": Field(str, "", container_id_text),
              "port": Field(int, 0, in_range(0, 65535))}


class ExecRequest(Record):
    """What the runtime hands the exec relay (as a descriptor: handoff) at `runc exec`;
    `member`: the container is a pod's member, whose VM is the sandbox's."""
    FIELDS = {"container_id": Field(str, ""), "process": Field(Process, Process),
              "member": Field(bool, False)}


# --- the guest kernel ------------------------------------------------------------------

class Boot(Record):
    """How to boot one guest kernel (a folder of the payload's kernels/): paths as the
    container and the guest see them."""
    FIELDS = {
        "name": Field(str, ""),             # what DKVM_KERNEL names it: a folder, or `image`
        "release": Field(str, ""),
        "kernel": Field(str, ""),           # the file QEMU loads (an ELF: the PVH entry)
        "initrd": Field(str, ""),           # "": it boots the export as its root
        "append": Field(ListOf(str), []),   # this kernel's own command line
        "modules": Field(str, ""),          # its lib/modules tree, for the guest to mount
        "source": Field(str, ""),           # where it comes from, for `dkvm kernels`
    }

    @property
    def from_image(self):
        """The image's own kernel: its modules are the image's, where it keeps them."""
        return self.name == IMAGE_KERNEL


# --- networking ------------------------------------------------------------------------

class Address(Record):
    FIELDS = {"family": Field(int, 0), "address": Field(str, ""), "prefixlen": Field(int, 0),
              "broadcast": Field(str, "")}


class Route(Record):
    """A main-table route out of one interface; `mac` names that interface in the guest."""
    FIELDS = {"family": Field(int, 0), "dst": Field(str, ""), "dst_len": Field(int, 0),
              "gateway": Field(str, ""), "metric": Field(int, 0), "proto": Field(int, 0),
              "scope": Field(int, 0), "mac": Field(str, "")}


class Interface(Record):
    """One of the container's interfaces, handed to the guest (same name, MAC, MTU,
    addresses, routes)."""
    FIELDS = {"name": Field(str, ""), "index": Field(int, 0), "mac": Field(str, ""),
              "mtu": Field(int, 1500), "ipv6": Field(bool, False),
              "addresses": Field(ListOf(Address), []), "routes": Field(ListOf(Route), [])}


STEP_KINDS = ("sysctl", "running", "link", "addr", "route")


class NetStep(Record):
    """One step of the guest's network set-up (made by the container side's net_steps):
    `sysctl` writes `sysctl`; `running` waits for NIC `name` to run (and, with `ipv6`,
    to have its link-local address); `link`, `addr`, `route` send `netlink` (hex, index
    0 for the guest to fill in) for the NIC with `mac`."""
    FIELDS = {"kind": Field(str, "sysctl", one_of(*STEP_KINDS)),
              "sysctl": Field(MapOf(str), {}),
              "name": Field(str, ""), "ipv6": Field(bool, False),
              "mac": Field(str, ""), "netlink": Field(str, ""), "what": Field(str, ""),
              "ignore": Field(ListOf(int), []),     # errnos that mean done already
              "optional": Field(bool, False)}       # skipped when no NIC has that MAC


class NetChange(Record):
    """NET: Docker changed the running container's networks; `steps` run once the
    hot-plugged NICs with the MACs in `wait_for` are there."""
    FIELDS = {"wait_for": Field(ListOf(str), []), "steps": Field(ListOf(NetStep), [])}


# --- the plan --------------------------------------------------------------------------

class Options(Record):
    """The DKVM_* options, one field per row of options.OPTIONS, of its default's type
    (`accel` resolved to kvm or tcg at create) but those whose value is a field of the
    plan itself (`plan_field`: DKVM_DISKS is the plan's `disks`)."""
    FIELDS = {option.attr: Field(type(option.default), option.default) for option in OPTIONS
              if not option.plan_field}


class Tmpfs(Record):
    FIELDS = {"destination": Field(str, ""), "options": Field(ListOf(str), [])}


MOST_POD_VOLUMES = 8        # a member's volumes exported once; the rest are in its export


class PodVolume(Record):
    """A pod member's directory volume: where it is in the member's root (resolved in
    the image, as runc resolves it), and the tag of its export (the sandbox's to set)."""
    FIELDS = {"destination": Field(str, ""), "tag": Field(str, "", container_id_text)}


class IdMapping(Record):
    """One line of a user namespace's uid_map or gid_map."""
    FIELDS = {"container_id": Field(int, 0, in_range(0, MAX_ID)),
              "host_id": Field(int, 0, in_range(0, MAX_ID)),
              "size": Field(int, 1, in_range(1, MAX_ID + 1))}


class Disk(Record):
    """DKVM_DISKS: a file in the container, attached as virtio-blk with `serial`,
    mounted at `mount_point` in the workload's root."""
    FIELDS = {"file": Field(str, ""), "mount_point": Field(str, ""),
              "filesystem": Field(str, "ext4"), "size": Field(int, 0, in_range(0, 1 << 60)),
              "serial": Field(str, "")}


class Device(Record):
    """`--device`: a node the workload finds in its /dev, as runc makes it."""
    FIELDS = {"path": Field(str, ""), "type": Field(str, "c", one_of("c", "b", "u", "p")),
              "major": Field(int, 0, in_range(0, MAX_ID)),
              "minor": Field(int, 0, in_range(0, MAX_ID)),
              "file_mode": Field(int, 0o666, in_range(0, 0o7777)),
              "uid": Field(int, 0, in_range(0, MAX_ID)),
              "gid": Field(int, 0, in_range(0, MAX_ID))}


# `docker exec`s running at once in one container, at most; a plan's own cap
# (max_execs) is what its memory limit has room for (host.vm_size.exec_slots).
MOST_EXECS = 24
POD_SANDBOX, POD_MEMBER = "sandbox", "member"


class Plan(Record):
    FIELDS = {
        "container_id": Field(str, ""),
        "process": Field(Process, Process),
        "options": Field(Options, Options),
        "cpus": Field(int, 0),                  # 0: as many as the container may use
        "memory_mib": Field(int, 1024),         # guest RAM
        "tcg_cache_mib": Field(int, 0),         # TCG's translation cache (0 under KVM)
        "max_execs": Field(int, MOST_EXECS, in_range(1, MOST_EXECS)),   # at once; more refused
        "boot": Field(Boot, Boot),
        "hostname": Field(str, ""),
        "domainname": Field(str, ""),
        "readonly_root": Field(bool, False),    # `--read-only`
        # linux.maskedPaths, readonlyPaths and rootfsPropagation in the image's tree
        # (the VM's own /proc and /sys are its workload's: guest_paths)
        "masked_paths": Field(ListOf(str), []),
        "readonly_paths": Field(ListOf(str), []),
        "root_propagation": Field(str, "", one_of("", *ROOT_PROPAGATIONS)),
        # a user namespace: the workload's, made in the guest (none when empty)
        "uid_mappings": Field(ListOf(IdMapping), []),
        "gid_mappings": Field(ListOf(IdMapping), []),
        # the engine made the network namespace (under /run/netns) and keeps it after
        # the container: the interfaces are given back at exit
        "network_namespace_kept": Field(bool, False),
        "sysctl": Field(MapOf(str), {}),        # `--sysctl`, `--domainname`
        "tmpfs": Field(ListOf(Tmpfs), []),      # `--tmpfs`: mounted in the guest
        "devices": Field(ListOf(Device), []),   # `--device`: made in the guest's /dev
        "disks": Field(ListOf(Disk), []),       # DKVM_DISKS, as host.settings reads it
        "pids_limit": Field(int, 0, in_range(0, MAX_ID)),   # `--pids-limit`, 0: none
        "dns_upstream": Field(ListOf(str), []),  # the host's name servers
        "winsize": Field(ListOf(int), [], set_by=ENTRYPOINT),      # [rows, cols], with -t
        # the limits runc's process would have had where config.json sets none: the
        # entrypoint's own (the engine's), for the workload and every exec
        "default_rlimits": Field(ListOf(Rlimit), [], set_by=ENTRYPOINT),
        # RLIMIT_NOFILE [soft, hard] as the engine gives it (the runtime's own): the
        # container side's own is raised for virtiofsd (host.container_side), not the workload's
        "engine_nofile": Field(ListOf(int), []),
        "interfaces": Field(ListOf(Interface), [], set_by=ENTRYPOINT),
        "network_setup": Field(ListOf(NetStep), [], set_by=ENTRYPOINT),
        # the template the VM is restored from (host.templates: its directory's name in
        # the payload's templates), "" for a cold boot
        "template": Field(str, "", lambda name: len(name) <= 64 and not name.startswith(".")
                          and all(c.isascii() and (c.isalnum() or c in "-.") for c in name)),
        # a restored VM's clock and fresh entropy (the template's are every VM's)
        "wall_clock_ns": Field(int, 0, in_range(0, 1 << 63), set_by=ENTRYPOINT),
        "entropy": Field(str, "", hex_text(128), set_by=ENTRYPOINT),
        # a Kubernetes pod's (host.pods): its sandbox runs the pod's VM; a member's
        # process runs in it, in the member's own root
        "pod": Field(str, "", one_of("", POD_SANDBOX, POD_MEMBER)),
        # a member in the pod's PID namespace, the pause's (shareProcessNamespace)
        "pod_shares_pid": Field(bool, False),
        # a member's directory volumes, each one export for the pod (at most
        # MOST_POD_VOLUMES)
        "pod_volumes": Field(ListOf(PodVolume), []),
    }

    @classmethod
    def fields_set_by(cls, who):
        return [name for name, field in cls.FIELDS.items() if field.set_by == who]


class MemberStart(Record):
    """MEMBER_START: a pod member's process and what the guest makes its container of
    (its plan: process, root's flags, masks, tmpfs, devices, user namespace), its
    terminal's size, and the tag of its hot-plugged export (the supervisor's to set)."""
    FIELDS = {"container_id": Field(str, "", container_id_text),
              "plan": Field(Plan, Plan), "winsize": Field(ListOf(int), []),
              "tag": Field(str, "", container_id_text)}
