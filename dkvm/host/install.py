"""`dkvm install` and `dkvm uninstall`: the files in a bin directory, the unpacked
payload, the operator's policy file (host.policy), and the runtime registered with
each engine."""
import os
import shutil

from dkvm import paths

PROGRAMS = ("dkvm-runtime", "dkvm")     # symlinks to dkvm.pyz: argv[0] picks the role


def install(bin_dir, runc, engines):
    from dkvm.host.facts import find_runc
    from dkvm.host.payload import archive_path, ensure_payload, prune_payloads
    runc = find_runc(runc)
    source = archive_path()
    target = os.path.join(bin_dir, "dkvm.pyz")
    os.makedirs(bin_dir, exist_ok=True)
    if os.path.realpath(source) != os.path.realpath(target):
        tmp = target + ".tmp"
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    for name in PROGRAMS:
        link = os.path.join(bin_dir, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink("dkvm.pyz", link)
    payload = ensure_payload(target)
    print(f"dkvm: payload at {payload}")
    removed, _ = prune_payloads(keep=os.path.basename(payload))
    if removed:
        print(f"dkvm: removed {len(removed)} unused payload(s) of other builds")
    from dkvm.host.policy import install_default
    print(f"dkvm: {install_default()}")
    from dkvm.host.templates import make_default_template
    print(f"dkvm: {make_default_template(payload)}")
    for engine in engines:
        print(f"dkvm: {engine.register(os.path.join(bin_dir, 'dkvm-runtime'), runc)}")
    return 0


def uninstall(bin_dir, engines, keep_files=False):
    """Everything install made, but a payload a running container still uses (its
    QEMU runs from it): that one goes with a later `uninstall` or `install`. With
    `keep_files`, only the engines' registrations go."""
    from dkvm.host.payload import prune_payloads, remove_tree
    for engine in engines:
        print(f"dkvm: {engine.unregister()}")
    if keep_files:
        return 0
    for name in PROGRAMS + ("dkvm.pyz",):
        path = os.path.join(bin_dir, name)
        if os.path.lexists(path):
            os.remove(path)
    _, in_use = prune_payloads()
    if in_use:
        print(f"dkvm: kept {len(in_use)} payload(s) in {paths.HOST_STATE_DIR} that running "
              "containers use; run `dkvm uninstall` again once they are gone")
    elif os.path.isdir(paths.HOST_STATE_DIR):
        remove_tree(paths.HOST_STATE_DIR)
    from dkvm.host.policy import remove_default
    removed = remove_default()
    if removed:
        print(f"dkvm: {removed}")
    elif os.path.lexists(paths.POLICY_FILE):
        print(f"dkvm: kept {paths.POLICY_FILE}: it is not the default policy")
    print("dkvm: uninstalled")
    return 0
