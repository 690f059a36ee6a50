"""The TOML DKVM writes into the engines' configs, as text in and text out: the runtime
class block in containerd's config.toml (added and taken out without touching a byte
of the rest, and checked to parse to what containerd will read), and the strings in
Podman's drop-in."""
from dkvm.errors import DkvmError
from dkvm.host.engines import RUNTIME_NAME

CONFIG = "/etc/containerd/config.toml"     # named in errors; the registration writes it
BEGIN = f"# BEGIN {RUNTIME_NAME}: written by `dkvm install`; `dkvm uninstall` removes this block"
END = f"# END {RUNTIME_NAME}"
CREATED = "# Created by `dkvm install`; `dkvm uninstall` removes it."
# config.toml's version -> the CRI plugin's table of runtimes
CRI_RUNTIMES = {1: ("plugins", "cri", "containerd", "runtimes"),
                2: ("plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes"),
                3: ("plugins", "io.containerd.cri.v1.runtime", "containerd", "runtimes")}


def add_containerd_runtime(text, runtime_path):
    """config.toml's text with DKVM's runtime class in it (replacing an earlier block of
    DKVM's), the rest as it was; None as `text` is a file that does not exist yet."""
    import tomllib
    base = remove_containerd_runtime(text) if text is not None else None
    if base is None:
        base = f"{CREATED}\nversion = 2\n"
    try:
        config = tomllib.loads(base)
    except tomllib.TOMLDecodeError as err:
        raise DkvmError(f"{CONFIG} is not valid TOML ({err}); "
                        "fix it first") from None
    version = config.get("version", 1)
    if version not in CRI_RUNTIMES:
        raise DkvmError(f"{CONFIG}: config version {version} is "
                        f"not known to dkvm (it knows {sorted(CRI_RUNTIMES)})")
    if containerd_runtime_section(base) is not None:
        raise DkvmError(f"{CONFIG} already has a runtime named "
                        f"'{RUNTIME_NAME}' that dkvm did not write; remove it first")
    table = ".".join(f'"{key}"' if "." in key else key for key in CRI_RUNTIMES[version])
    runtimes = runtimes_table(config)
    cri = config.get("plugins", {}).get(CRI_RUNTIMES[version][1], {})
    default = cri.get("containerd", {}).get("default_runtime_name", "runc")
    block = [BEGIN]
    if default not in runtimes:
        # a runtimes table in the file replaces containerd's built-in one, runc and all
        block += [f"[{table}.{default}]", '  runtime_type = "io.containerd.runc.v2"']
    block += [f"[{table}.{RUNTIME_NAME}]",
              '  runtime_type = "io.containerd.runc.v2"',
              f"[{table}.{RUNTIME_NAME}.options]",
              f'  BinaryName = "{toml_string(runtime_path)}"']
    systemd = runtimes.get(default, {}).get("options", {}).get("SystemdCgroup")
    if systemd is not None:             # the kubelet's cgroup driver: runc's must match it
        block.append(f"  SystemdCgroup = {str(bool(systemd)).lower()}")
    block.append(END)
    text = base + ("" if base.endswith("\n") else "\n") + "\n".join(block) + "\n"
    try:
        section = containerd_runtime_section(text)
    except tomllib.TOMLDecodeError as err:
        section, why = None, str(err)
    else:
        why = "the runtime is not where containerd looks for it"
    if section is None or section.get("options", {}).get("BinaryName") != runtime_path:
        raise DkvmError(f"{CONFIG}: adding the dkvm runtime class "
                        f"would not give containerd a valid config ({why}); add it by hand "
                        "as the README shows")
    return text


def remove_containerd_runtime(text):
    """config.toml's text without DKVM's block; None when DKVM created the file and
    nothing else is left in it."""
    lines = text.splitlines(keepends=True)
    kept, inside = [], False
    for line in lines:
        if line.rstrip("\n") == BEGIN:
            inside = True
        elif inside and line.rstrip("\n") == END:
            inside = False
        elif not inside:
            kept.append(line)
    result = "".join(kept)
    if result.startswith(CREATED + "\n") and result[len(CREATED) + 1:] == "version = 2\n":
        return None
    return result


def containerd_runtime_section(text):
    """The table of the runtime named dkvm in config.toml's text, or None."""
    import tomllib
    return runtimes_table(tomllib.loads(text)).get(RUNTIME_NAME)


def runtimes_table(config):
    """The CRI plugin's runtimes in a parsed config.toml ({} when it names none)."""
    node = config
    for key in CRI_RUNTIMES.get(config.get("version", 1), ()):
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def toml_string(value):
    if any(c in value for c in '"\\\n') or not value.isprintable():
        raise DkvmError(f"{value!r}: a path with quotes, backslashes or control "
                        "characters cannot be registered")
    return value
