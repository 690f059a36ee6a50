"""A Kubernetes pod is one VM (host.pods): which pod role a create is, proven by what no
image can choose; the sandbox's create (a VM, and the pod's directory made fresh), a
member's (no VM: the relay, the pod's directory found), exec into a member, and the
sandbox's delete (the pod's directory removed, no link followed). The configs are the
ones containerd 1.6's CRI really wrote (tests/fixtures/cri-config-*.json)."""
import json
import os

import pytest

from unitutil import FIXTURES, Exec, load_config, plan_of
from dkvm import handoff, paths, schema
from dkvm.errors import DkvmError
from dkvm.host import pods
from dkvm.host.container_side import KVM, TUN
from dkvm.roles import runtime

SANDBOX_ID = "c93630c3bb9bb2350153f745e30e6ab82aab7c7920118a42844af58d7eec4b48"
MEMBER_ID = "14dee86b4dc0963ae812b57a2034a42bccc5ac49ccf9e5111989a46dec2f6b81"


@pytest.fixture
def pods_dir(tmp_path, monkeypatch):
    """The host's pods directory, for a test: never the real /run/dkvm/pods."""
    path = tmp_path / "run" / "dkvm" / "pods"
    monkeypatch.setattr(paths, "HOST_PODS_DIR", str(path))
    return path


def cri_config(role):
    """What containerd 1.6's CRI wrote for a pod's sandbox or an app container of it."""
    return json.loads((FIXTURES / f"cri-config-{role}.json").read_text())


def cri_bundle(tmp_path, config, name, state="run/containerd", namespace="k8s.io"):
    """A bundle where containerd's shim v2 makes it: <state>/<task dir>/<namespace>/<id>."""
    bundle = tmp_path / state / "io.containerd.runtime.v2.task" / namespace / name
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def create(bundle, container_id):
    return runtime.main(["dkvm-runtime", "--log", str(bundle / "log.json"), "--log-format",
                         "json", "create", "--bundle", str(bundle), container_id])


def test_the_pod_roles_are_the_schemas():
    assert (pods.POD_SANDBOX, pods.POD_MEMBER) == (schema.POD_SANDBOX, schema.POD_MEMBER)


# --- which role: the proof ---------------------------------------------------------

@pytest.mark.parametrize("state", ["run/containerd", "run/k3s/containerd"])
def test_cris_sandbox_and_container_are_the_pods(tmp_path, state):
    sandbox, member = cri_config("sandbox"), cri_config("member")
    assert pods.pod_role(sandbox, cri_bundle(tmp_path, sandbox, SANDBOX_ID, state),
                         SANDBOX_ID) == ("sandbox", SANDBOX_ID)
    assert pods.pod_role(member, cri_bundle(tmp_path, member, MEMBER_ID, state),
                         MEMBER_ID) == ("member", SANDBOX_ID)


CRI_SANDBOX = {"io.kubernetes.cri.container-type": "sandbox",
               "io.kubernetes.cri.sandbox-id": "pause"}
CRI_MEMBER = {"io.kubernetes.cri.container-type": "container",
              "io.kubernetes.cri.sandbox-id": "pause"}


@pytest.mark.parametrize("annotations, namespace, name", [
    ({"io.kubernetes.cri-o.ContainerType": "sandbox"}, "k8s.io", "pause"),
    ({"io.kubernetes.cri.container-type": "sandbox"}, "k8s.io", "pause"),
    ({**CRI_SANDBOX, "io.kubernetes.cri.sandbox-id": "another"}, "k8s.io", "pause"),
    ({**CRI_SANDBOX, "io.kubernetes.cri.container-type": "other"}, "k8s.io", "pause"),
    ({**CRI_SANDBOX, "io.kubernetes.cri.sandbox-id": 7}, "k8s.io", "pause"),
    (CRI_SANDBOX, "moby", "pause"),
    (CRI_SANDBOX, "k8s.io", "pause-x"),
    (CRI_SANDBOX, None, "pause"),
    (CRI_MEMBER, "k8s.io", "pause"),            # a member of its own pod
    (CRI_MEMBER, "moby", "app"),
    (CRI_MEMBER, None, "app"),
])
def test_annotations_an_image_can_carry_make_no_pod(tmp_path, annotations, namespace, name):
    """Engines copy an image's annotations into the config (Podman does): unless the
    bundle is CRI's, the container is a VM of its own, not a member of a pod it names
    (whose VM it would run in) nor a sandbox."""
    config = {**load_config("plain"), "annotations": dict(annotations)}
    if namespace is None:
        bundle = tmp_path / "containers" / "storage" / name / "userdata"
        bundle.mkdir(parents=True)
    else:
        bundle = cri_bundle(tmp_path, config, name, namespace=namespace)
    assert pods.pod_role(config, bundle, name) == ("", "")


def test_a_link_to_cris_state_is_not_cris_state(tmp_path):
    """The bundle's real path counts: a link named like CRI's task directory that
    leads elsewhere (to Podman's userdata, say) proves nothing."""
    config = {**load_config("plain"), "annotations": dict(CRI_SANDBOX)}
    real = tmp_path / "userdata"
    real.mkdir()
    link = tmp_path / "state" / "io.containerd.runtime.v2.task" / "k8s.io" / "pause"
    link.parent.mkdir(parents=True)
    link.symlink_to(real)
    assert pods.pod_role(config, link, "pause") == ("", "")


@pytest.mark.parametrize("sandbox_id", ["..", ".", "a/b", "../../etc", "", "x" * 129,
                                        "a.b", "tab\there"])
def test_a_sandbox_id_that_could_leave_the_pods_directory_is_refused(tmp_path, sandbox_id):
    config = {**load_config("plain"), "annotations": {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": sandbox_id}}
    with pytest.raises(DkvmError, match="sandbox id .* is not one DKVM names"):
        pods.pod_role(config, cri_bundle(tmp_path, config, "app"), "app")


# --- the sandbox: a VM, with the pod's directory -------------------------------------

def pod_mount(config):
    (mount,) = [m for m in config["mounts"] if m["destination"] == paths.POD_DIR]
    return mount


def test_the_sandbox_is_a_vm_with_the_pods_directory(fake_host, tmp_path, pods_dir):
    config = cri_config("sandbox")
    bundle = cri_bundle(tmp_path, config, SANDBOX_ID)
    assert create(bundle, SANDBOX_ID) == 0
    new = fake_host["config"]
    plan = plan_of(new)
    assert plan.pod == "sandbox" and plan.process.args == ["/pause"]
    assert new["process"]["args"] == paths.role_argv("dkvm-ctr-entrypoint")
    assert any(d["path"] == TUN["path"] for d in new["linux"]["devices"])
    # the pod's network namespace is the VM's, kept after it (a CNI path)
    assert plan.network_namespace_kept
    # the pod's directory: fresh, root's alone, mounted last (after DKVM's own)
    pod = pods_dir / SANDBOX_ID
    assert pod.is_dir() and not pod.is_symlink() and list(pod.iterdir()) == []
    assert (os.stat(pod).st_uid, os.stat(pod).st_mode & 0o777) == (0, 0o700)
    assert new["mounts"][-1] == pod_mount(new)
    assert pod_mount(new)["source"] == str(pod) and pod_mount(new)["type"] == "bind"
    assert {"nosuid", "nodev", "noexec"} <= set(pod_mount(new)["options"])
    assert (bundle / paths.SKELETON / "pod").is_dir()
    # the sandbox is an ordinary VM: a template for its size, as for any container
    assert fake_host["templates"]
    assert json.loads((bundle / "config.json").read_text()) == config


def test_the_sandboxs_directory_is_made_fresh_without_following_links(fake_host, tmp_path,
                                                                      pods_dir):
    """A create of the same id again (an earlier one failed before its delete): what
    the earlier container side left there goes, and a link there is removed, not
    followed."""
    outside = tmp_path / "host-file"
    outside.write_text("keep")
    (tmp_path / "host-dir").mkdir()
    (tmp_path / "host-dir" / "f").write_text("keep")
    old = pods_dir / SANDBOX_ID
    (old / "nested" / "deeper").mkdir(parents=True)
    (old / "members.sock").write_text("")
    (old / "nested" / "link").symlink_to(outside)
    (old / "dirlink").symlink_to(tmp_path / "host-dir")
    assert create(cri_bundle(tmp_path, cri_config("sandbox"), SANDBOX_ID),
                  SANDBOX_ID) == 0
    assert list(old.iterdir()) == []
    assert outside.read_text() == "keep" and (tmp_path / "host-dir" / "f").read_text() == "keep"


@pytest.mark.parametrize("kind", ["link", "file", "not-roots"])
def test_a_pods_directory_that_is_not_roots_plain_directory_is_refused(fake_host, tmp_path,
                                                                       pods_dir, kind):
    target = tmp_path / "elsewhere"
    target.mkdir()
    pods_dir.mkdir(parents=True, mode=0o700)
    pod = pods_dir / SANDBOX_ID
    if kind == "link":
        pod.symlink_to(target)
    elif kind == "file":
        pod.write_text("")
    else:
        pod.mkdir()
        os.chown(pod, 1000, 1000)
    bundle = cri_bundle(tmp_path, cri_config("sandbox"), SANDBOX_ID)
    with pytest.raises(DkvmError, match=f"the directory of pod {SANDBOX_ID} .* is not a "
                                        "directory of root's"):
        create(bundle, SANDBOX_ID)
    assert "exec" not in fake_host
    assert target.is_dir() and pod.is_symlink() == (kind == "link")
    assert "is not a directory of root's" in (bundle / "log.json").read_text()


def test_a_pods_directory_anyone_may_write_is_refused(fake_host, tmp_path, pods_dir):
    pods_dir.mkdir(parents=True)
    pods_dir.chmod(0o777)
    with pytest.raises(DkvmError, match="is not root's alone"):
        create(cri_bundle(tmp_path, cri_config("sandbox"), SANDBOX_ID), SANDBOX_ID)


# --- a member: no VM, the relay, the pod's directory found -----------------------------

def make_sandbox(fake_host, tmp_path):
    assert create(cri_bundle(tmp_path, cri_config("sandbox"), SANDBOX_ID),
                  SANDBOX_ID) == 0
    fake_host.clear()


def test_a_member_is_the_relay_in_the_pods_network_namespace(fake_host, tmp_path, pods_dir):
    make_sandbox(fake_host, tmp_path)
    config = cri_config("member")
    bundle = cri_bundle(tmp_path, config, MEMBER_ID)
    assert create(bundle, MEMBER_ID) == 0
    new = fake_host["config"]
    plan = plan_of(new)
    assert plan.pod == "member" and plan.container_id == MEMBER_ID
    assert plan.process.args == ["sh", "-c", "echo hello; echo err >&2; "
                                 "exec httpd -f -p 8080 -h /"]
    assert "POD_NAME=smoke" in plan.process.env
    assert new["process"]["args"] == paths.role_argv("dkvm-pod-member")
    # no VM: no TUN, no KVM, no template, none made
    devices = {(d["major"], d["minor"]) for d in new["linux"]["devices"]}
    rules = {(r.get("major"), r.get("minor")) for r in new["linux"]["resources"]["devices"]}
    for dev in (TUN, KVM):
        assert (dev["major"], dev["minor"]) not in devices | rules
    assert plan.template == "" and "templates" not in fake_host
    # no capability: it only connects, the sandbox's side serves its root
    caps = new["process"]["capabilities"]
    assert caps["bounding"] == [] and caps["effective"] == []
    # the sandbox's network namespace, as CRI gives it (the fixture's PID is past Linux's
    # PID_MAX_LIMIT: no process of the machine running the tests can be the host's there)
    (net,) = [ns for ns in new["linux"]["namespaces"] if ns["type"] == "network"]
    assert net["path"] == "/proc/4242424/ns/net"
    # the image's root and the kubelet's mounts in the export, then DKVM's, then the pod's
    assert new["mounts"][0]["destination"] == paths.SHARED_ROOTFS
    assert paths.SHARED_ROOTFS + "/etc/hosts" in [m["destination"] for m in new["mounts"]]
    assert new["mounts"][-1] == pod_mount(new)
    assert pod_mount(new)["source"] == str(pods_dir / SANDBOX_ID)
    assert new["root"] == {"path": os.path.realpath(bundle / paths.SKELETON), "readonly": True}
    assert json.loads((bundle / "config.json").read_text()) == config


def test_a_members_vm_options_are_not_read(fake_host, tmp_path, pods_dir):
    """DKVM_* settings size and shape a VM, the sandbox's: a member's are left out of
    its environment, and even a bad value or one the operator's alone is no error."""
    make_sandbox(fake_host, tmp_path)
    config = cri_config("member")
    config["process"]["env"] += ["DKVM_ACCEL=foo", "DKVM_MEMORY=1", "DKVM_SYS_ADMIN=1"]
    assert create(cri_bundle(tmp_path, config, MEMBER_ID), MEMBER_ID) == 0
    new = fake_host["config"]
    assert not [e for e in plan_of(new).process.env if e.startswith("DKVM_")]
    assert "CAP_SYS_ADMIN" not in new["process"]["capabilities"]["bounding"]


def test_a_member_of_a_pod_without_its_directory_is_refused(fake_host, tmp_path, pods_dir):
    """Its sandbox was not DKVM's (another runtime class), or is gone: one line that
    names the pod, runc not run, the config as the engine wrote it."""
    config = cri_config("member")
    bundle = cri_bundle(tmp_path, config, MEMBER_ID)
    for _ in range(2):          # no pods directory at all, then none for this pod
        with pytest.raises(DkvmError, match=f"pod {SANDBOX_ID} has no DKVM sandbox"):
            create(bundle, MEMBER_ID)
        (pods_dir / "another").mkdir(parents=True, exist_ok=True)
    assert "exec" not in fake_host
    assert json.loads((bundle / "config.json").read_text()) == config


def test_another_containers_namespace_is_still_refused_to_a_vm(fake_host, tmp_path):
    """/proc/PID/ns/net is a member's alone: the same config not proven CRI's is a VM,
    which needs a namespace of its own."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(cri_config("member")))
    with pytest.raises(DkvmError, match="container:NAME is not supported"):
        create(bundle, MEMBER_ID)


# --- exec into a member --------------------------------------------------------------

def exec_request(tmp_path, monkeypatch, container_id, log):
    passed = {}
    monkeypatch.setattr(handoff, "pass_request", lambda fd, text: passed.update({fd: text}))
    process_file = tmp_path / f"process-{container_id}.json"
    process_file.write_text(json.dumps({"args": ["id"], "cwd": "/"}))
    with pytest.raises(Exec):
        runtime.main(["dkvm-runtime", "--log", str(log), "--log-format", "json", "exec",
                      "--process", str(process_file), "--detach", container_id])
    return json.loads(passed[3])


def test_an_exec_into_a_member_asks_the_pod(fake_host, tmp_path, pods_dir, monkeypatch):
    """containerd's shim names runc's log in the bundle: there, the plan the runtime
    wrote at create says the container is a member; the sandbox and a container
    elsewhere are not."""
    make_sandbox(fake_host, tmp_path)
    member = cri_bundle(tmp_path, cri_config("member"), MEMBER_ID)
    assert create(member, MEMBER_ID) == 0
    sandbox = member.parent / SANDBOX_ID
    assert exec_request(tmp_path, monkeypatch, MEMBER_ID, member / "log.json")["member"]
    assert not exec_request(tmp_path, monkeypatch, SANDBOX_ID, sandbox / "log.json")["member"]
    # the member's log named for another container, or another file: not proof
    assert not exec_request(tmp_path, monkeypatch, "other", member / "log.json")["member"]
    assert not exec_request(tmp_path, monkeypatch, MEMBER_ID, member / "x.json")["member"]
    assert not exec_request(tmp_path, monkeypatch, MEMBER_ID, tmp_path / "log.json")["member"]


def test_a_plan_that_is_a_link_makes_no_member(tmp_path):
    bundle = cri_bundle(tmp_path, {}, MEMBER_ID)
    (bundle / paths.SKELETON).mkdir()
    elsewhere = tmp_path / "plan.json"
    elsewhere.write_text(json.dumps({"pod": "member"}))
    (bundle / paths.SKELETON / paths.PLAN_FILE).symlink_to(elsewhere)
    assert not pods.is_member_exec(MEMBER_ID, str(bundle / "log.json"))
    os.unlink(bundle / paths.SKELETON / paths.PLAN_FILE)
    (bundle / paths.SKELETON / paths.PLAN_FILE).write_text(json.dumps({"pod": "member"}))
    assert pods.is_member_exec(MEMBER_ID, str(bundle / "log.json"))


# --- delete: the pod's directory goes with the sandbox --------------------------------

@pytest.fixture
def runc_status(monkeypatch):
    """runc's delete faked: its exit status is the dict's "status"; the calls it got
    are in "calls"."""
    state = {"status": 0, "calls": []}

    def run_runc(path, args):
        state["calls"].append(args)
        return state["status"]
    monkeypatch.setattr(runtime, "run_runc", run_runc)
    return state


def cri_log(tmp_path, container_id=SANDBOX_ID):
    """runc's log as containerd's shim names it: in the task's bundle in CRI's state."""
    bundle = tmp_path / "state" / pods.CONTAINERD_TASK_DIR / pods.CRI_NAMESPACE / container_id
    bundle.mkdir(parents=True, exist_ok=True)
    return str(bundle / pods.RUNC_LOG)


def delete(*args, log=None):
    return runtime.main(["dkvm-runtime", "--root", "/r", *(["--log", log] if log else []),
                         "delete", *args])


def test_the_sandboxs_delete_removes_its_directory_no_link_followed(fake_host, tmp_path,
                                                                     pods_dir, runc_status):
    outside = tmp_path / "host-dir"
    outside.mkdir()
    (outside / "f").write_text("keep")
    pod = pods_dir / SANDBOX_ID
    (pod / "a" / "b").mkdir(parents=True)
    (pod / "members.sock").write_text("")
    (pod / "a" / "b" / "link").symlink_to(outside)
    (pod / "a" / "file").write_text("")
    (pods_dir / "other").mkdir()
    log = cri_log(tmp_path)
    runc_status["status"] = 1               # the sandbox still runs: runc refuses
    assert delete(SANDBOX_ID, log=log) == 1
    assert (pod / "members.sock").exists()
    runc_status["status"] = 0
    assert delete("--force", SANDBOX_ID, log=log) == 0
    assert runc_status["calls"][-1] == ["--root", "/r", "--log", log, "delete", "--force",
                                        SANDBOX_ID]
    assert not os.path.lexists(pod)
    assert (outside / "f").read_text() == "keep" and (pods_dir / "other").is_dir()


def test_a_delete_of_another_container_is_runcs_alone(fake_host, pods_dir, runc_status,
                                                      tmp_path):
    (pods_dir / SANDBOX_ID).mkdir(parents=True)
    for container_id in (MEMBER_ID, "..", "a/b"):
        with pytest.raises(Exec):
            delete(container_id, log=cri_log(tmp_path, MEMBER_ID))
    # the sandbox's id, from another engine (its bundle is not in CRI's state)
    other_bundle = tmp_path / "moby" / SANDBOX_ID
    other_bundle.mkdir(parents=True)
    for log in (None, str(other_bundle / pods.RUNC_LOG)):
        with pytest.raises(Exec):
            delete(SANDBOX_ID, log=log)
    assert runc_status["calls"] == [] and (pods_dir / SANDBOX_ID).is_dir()


def test_a_pods_directory_that_cannot_be_removed_is_one_line_in_runcs_log(
        fake_host, tmp_path, pods_dir, runc_status, monkeypatch):
    (pods_dir / SANDBOX_ID).mkdir(parents=True)

    def busy(*args, **kw):
        raise OSError(16, "Device or resource busy", "x")
    monkeypatch.setattr(pods.os, "rmdir", busy)
    log = cri_log(tmp_path)
    with pytest.raises(DkvmError, match=f"the directory of pod {SANDBOX_ID} .* cannot be "
                                        "removed: Device or resource busy"):
        runtime.main(["dkvm-runtime", "--log", log, "--log-format", "json", "delete",
                      SANDBOX_ID])
    assert "cannot be removed" in json.loads(open(log).read())["msg"]


def test_a_tree_deeper_than_python_recurses_is_removed(tmp_path, pods_dir):
    pod = pods_dir / SANDBOX_ID
    pod.mkdir(parents=True)
    fd = os.open(pod, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1500):                   # relative steps: the path would be too long
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)
    pods.remove_pod_dir(SANDBOX_ID)
    assert not os.path.lexists(pod)
    pods.remove_pod_dir(SANDBOX_ID)         # gone already: nothing to do
