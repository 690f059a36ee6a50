"""Kubernetes as the kubelet drives a runtime: containerd's CRI plugin (a private
containerd, a CNI bridge; tests/e2e/cri.py) runs pods with runtime handler `runc`, the
oracle, and the same steps with each handler in HANDLERS. A one-container pod (pod IP
and hostPort from the host, ExecSync, streaming exec with stdin and with a tty,
port-forward, the CRI log and its reopening, stop with grace, exit codes), a
two-container pod (localhost, a shared emptyDir, a sidecar re-created while the server
runs) and pod deletion leaving nothing on the host."""
import hashlib
import ipaddress
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import cri
from dockerutil import http_get
from waiting import wait_until

# the runtime handlers (RuntimeClass handlers) every test runs with; runc is the oracle
HANDLERS = ["runc", "dkvm"]
# a hostPort per handler: a handler's web pod may outlive the switch to the next one
HOST_PORTS = {handler: 31080 + number for number, handler in enumerate(HANDLERS)}
HTTP_REQUEST = b"GET / HTTP/1.0\r\n\r\n"
LONG_LINE = 20000      # longer than containerd's max_container_log_line_size (16 KiB)
# the web pod's one container: a page on 8080 (busybox httpd, daemonized), a line longer
# than the CRI log's line limit, then a tick on stdout and a tock on stderr twice a second
WEB = ("mkdir -p /www && echo {text} > /www/index.html && httpd -p 8080 -h /www && "
       f"head -c {LONG_LINE} /dev/zero | tr '\\0' x && echo && "
       "i=0; while :; do echo tick-$i; echo tock-$i >&2; i=$((i+1)); sleep 0.5; done")


@pytest.fixture(scope="session")
def node():
    """The session's containerd (CRI, CNI bridge, the test images) and a CRI client;
    afterwards every pod is removed, containerd stopped and its bridge deleted."""
    for tool in ("containerd", "ctr", "ip", "iptables"):
        if not shutil.which(tool):
            pytest.skip(f"no {tool} on this host")
    if not Path(cri.CNI_BIN_DIR, "bridge").exists():
        pytest.skip(f"no CNI plugins in {cri.CNI_BIN_DIR} (containernetworking-plugins)")
    daemon = cri.Containerd()
    daemon.start()
    client = None
    try:
        daemon.import_images()
        client = cri.Cri()
        client.remove_every_pod()           # an interrupted session's, kept in its root
        yield client
    finally:
        if client is not None:
            client.remove_every_pod()
            client.close()
        daemon.stop()
    assert not Path("/sys/class/net", cri.BRIDGE).exists()
    assert [line for line in open("/proc/self/mountinfo")
            if str(cri.ROOT) in line or "/run/netns/cni-" in line] == []
    assert list(Path("/sys/fs/cgroup").glob(f"*{cri.CGROUP_PARENT}")) == []
    assert "CNI-HOSTPORT" not in subprocess.run(["iptables", "-t", "nat", "-S"], text=True,
                                                capture_output=True, timeout=30).stdout


@pytest.fixture
def pods(node):
    """pods(name, handler, ...) -> a running sandbox; each deleted afterwards as the
    kubelet deletes a pod, whatever the test did."""
    made = []

    def run(name, handler, **kwargs):
        pod = cri.Pod(node, f"{name}-{handler}", **kwargs)
        made.append(pod)
        pod.run(handler)
        return pod
    yield run
    for pod in made:
        pod.delete()


@pytest.fixture(scope="module", params=HANDLERS)
def web(request, node):
    """A one-container pod per handler, shared by the tests that only look at it: a web
    server with a hostPort, and a container logging twice a second."""
    handler = request.param
    pod = cri.Pod(node, f"web-{handler}", port_mappings=[(8080, HOST_PORTS[handler])])
    try:
        pod.run(handler)
        pod.text = f"served-by-{handler}"
        pod.handler = handler
        pod.container = pod.start("web", WEB.format(text=pod.text))
        node.wait_state(pod.container, cri.CONTAINER_RUNNING)
        yield pod
    finally:
        pod.delete()


# --- a one-container pod ------------------------------------------------------------

def test_pod_ip_and_host_port_reach_the_server_from_the_host(web):
    assert ipaddress.ip_address(web.ip()) in ipaddress.ip_network(cri.SUBNET)
    assert http_get(web.ip(), timeout=60) == web.text
    # the hostPort on the node's own address (portmap's DNAT of local traffic)
    assert http_get(cri.GATEWAY, timeout=60, port=HOST_PORTS[web.handler]) == web.text


def test_exec_sync_gives_stdout_stderr_and_the_exit_code(node, web):
    assert node.exec_sync(web.container, ["sh", "-c", "echo out; echo err >&2; exit 3"]) \
        == (3, "out\n", "err\n")
    assert node.exec_sync(web.container, ["cat", "/www/index.html"]) == (0, web.text + "\n", "")
    code, out, _ = node.exec_sync(web.container, ["uname", "-r"])
    # runc shares the host's kernel; a VM runtime's pod has a kernel of its own
    assert code == 0 and (out.strip() == os.uname().release) == (web.handler == "runc")


def test_exec_sync_of_a_missing_command_fails_as_with_runc(node, web):
    """runc fails the exec itself (an RPC error); DKVM's relay starts, and the guest
    fails it with runc's words and runc's exit code for an exec that cannot start
    (README: Limitations)."""
    import grpc
    if web.handler == "runc":
        with pytest.raises(grpc.RpcError) as failure:
            node.exec_sync(web.container, ["/no/such/command"])
        said = failure.value.details()
    else:
        code, out, err = node.exec_sync(web.container, ["/no/such/command"])
        assert code == 126
        said = out + err        # where `docker exec` shows runc's words under DKVM
    assert "/no/such/command" in said
    assert "no such file or directory" in said


def test_streaming_exec_carries_stdin_stdout_stderr_and_the_exit_code(node, web):
    url = node.exec_url(web.container, ["sh", "-c", 'read a; read b; echo "$b $a"; '
                                        "echo to-stderr >&2; exit 5"], stdin=True)
    session = cri.ExecSession(url)
    session.send("one\ntwo\n")
    assert session.wait() == 5
    assert (session.stdout, session.stderr) == ("two one\n", "to-stderr\n")


def test_streaming_exec_with_a_tty_is_a_terminal_that_follows_resizes(node, web):
    session = cri.ExecSession(node.exec_url(web.container, ["sh"], stdin=True, tty=True))
    session.resize(24, 80)              # as kubectl sends its terminal's size at once
    session.read_until(lambda out: "# " in out, "the shell's prompt")
    session.send("tty\n")
    session.read_until(lambda out: "/dev/pts/" in out, "tty's answer")
    for rows, cols in ((30, 100), (45, 132)):
        session.resize(rows, cols)

        def reports_size():
            session.send("stty size\n")
            try:
                session.read_until(lambda out: f"{rows} {cols}\r\n" in out, "the size", 2)
                return True
            except AssertionError:
                return False
        wait_until(reports_size, f"the exec's terminal to take the size {rows}x{cols}",
                   timeout=60, interval=0)
    session.send("exit 7\n")
    assert session.wait() == 7
    assert session.stderr == ""          # a tty has one stream


def serving(web):
    """The web pod's server is up (its container's start does not wait for it)."""
    assert http_get(web.ip(), timeout=60) == web.text


def test_port_forward_reaches_the_pods_port(node, web):
    serving(web)
    answer = cri.port_forward(node.port_forward_url(web.id, 8080), 8080, HTTP_REQUEST)
    assert answer.startswith(b"HTTP/1.") and answer.rstrip().endswith(web.text.encode())


def test_port_forward_carries_megabytes_whole(node, web):
    """More than the exec channel's window (256 KiB) each way does: the whole file."""
    serving(web)
    code, _, err = node.exec_sync(web.container, [
        "sh", "-c", "head -c 3000000 /dev/urandom > /www/big.bin"])
    assert code == 0, err
    _, digest, _ = node.exec_sync(web.container, ["md5sum", "/www/big.bin"])
    answer = cri.port_forward(node.port_forward_url(web.id, 8080), 8080,
                              b"GET /big.bin HTTP/1.0\r\n\r\n")
    body = answer.split(b"\r\n\r\n", 1)[1]
    assert len(body) == 3000000 and hashlib.md5(body).hexdigest() == digest.split()[0]


def test_port_forward_to_a_closed_port_reports_an_error(node, web):
    serving(web)
    received, errors = cri.port_forward_exchange(node.port_forward_url(web.id, 8081), 8081,
                                                 HTTP_REQUEST)
    assert received == b"" and errors


def test_the_log_file_has_both_streams_and_follows_reopen(node, web):
    path = web.log_path("web")
    lines = wait_until(lambda: (lambda ls: any(t == "tock-1" for _, t in ls) and ls)(
        cri.read_log(path)), "two ticks in the CRI log", timeout=60)
    # a line longer than the limit is split into partial records and joined back
    assert ("stdout", "x" * LONG_LINE) in lines
    assert ("stdout", "tick-0") in lines and ("stderr", "tock-0") in lines
    assert "stdout P " in path.read_text()
    # the kubelet's rotation: rename the file, ask the runtime to reopen it
    rotated = path.with_name(path.name + ".20260101-000000")
    path.rename(rotated)
    node.reopen_container_log(web.container)
    fresh = wait_until(lambda: path.exists() and [t for s, t in cri.read_log(path)
                                                  if s == "stdout"], "ticks in the new log")
    # after the reopen the rotated file no longer grows, and the new one carries on
    before = rotated.read_text()
    wait_until(lambda: len(cri.read_log(path)) > len(fresh) + 2, "more ticks", timeout=30)
    assert rotated.read_text() == before
    last_old = max(int(t.split("-")[1]) for s, t in cri.read_log(rotated) if s == "stdout"
                   and t.startswith("tick-"))
    first_new = min(int(t.split("-")[1]) for t in fresh if t.startswith("tick-"))
    assert first_new > last_old


@pytest.mark.parametrize("handler", HANDLERS)
def test_stop_with_grace_kills_a_workload_that_ignores_term_when_it_is_up(pods, node,
                                                                          handler):
    pod = pods("stubborn", handler)
    container = pod.start("main", "trap 'echo TERM ignored' TERM; echo ready; "
                                  "while :; do sleep 1 & wait $!; done")
    wait_until(lambda: ("stdout", "ready") in cri.read_log(pod.log_path("main")), "ready")
    grace = 5
    started = time.monotonic()
    node.stop_container(container, timeout=grace)
    took = time.monotonic() - started
    status = node.wait_state(container, cri.CONTAINER_EXITED, timeout=30)
    assert grace - 0.5 <= took <= grace + 30, took
    assert (status.exit_code, status.reason) == (137, "Error")
    assert ("stdout", "TERM ignored") in cri.read_log(pod.log_path("main"))


@pytest.mark.parametrize("handler", HANDLERS)
def test_stop_with_grace_ends_a_workload_that_handles_term_at_once(pods, node, handler):
    pod = pods("polite", handler)
    container = pod.start("main", "trap 'echo bye; exit 42' TERM; echo ready; "
                                  "while :; do sleep 1 & wait $!; done")
    wait_until(lambda: ("stdout", "ready") in cri.read_log(pod.log_path("main")), "ready")
    started = time.monotonic()
    node.stop_container(container, timeout=30)
    took = time.monotonic() - started
    status = node.wait_state(container, cri.CONTAINER_EXITED, timeout=30)
    assert took < 15, took
    assert (status.exit_code, status.reason) == (42, "Error")
    assert ("stdout", "bye") in cri.read_log(pod.log_path("main"))


@pytest.mark.parametrize("handler", HANDLERS)
def test_exit_codes_and_reasons_are_the_workloads(pods, node, handler):
    pod = pods("exits", handler)
    for script, code, reason, said in (("echo failing; exit 3", 3, "Error", "failing"),
                                       ("echo done", 0, "Completed", "done")):
        container = pod.start("main", script)
        status = node.wait_state(container, cri.CONTAINER_EXITED, timeout=60)
        assert (status.exit_code, status.reason) == (code, reason)
        assert cri.read_log(pod.log_path("main")) == [("stdout", said)]
        node.remove_container(container)
    assert list(node.list_containers(pod.id)) == []


# --- a two-container pod ------------------------------------------------------------

SERVER = ("echo server-page > /shared/from-server && mkdir -p /www && "
          "echo served-on-localhost > /www/index.html && exec httpd -f -p 8080 -h /www")
# fetches the server's page over localhost into the emptyDir (a try before the server
# listens is silent: the server is running, not yet listening, under either runtime),
# reads the server's file from it; stays when the test has put `stay` into the volume
SIDECAR = ("for i in $(seq 300); do "
           "page=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc 127.0.0.1 8080 2>/dev/null "
           "| tail -n 1); "
           "[ -n \"$page\" ] && break; sleep 0.2; done; "
           "echo \"$page\" > /shared/from-sidecar; echo \"sidecar saw $page\"; "
           "cat /shared/from-server; [ -e /shared/stay ] && exec sleep 1000; exit 0")


@pytest.mark.parametrize("handler", HANDLERS)
def test_two_containers_share_localhost_and_an_empty_dir_and_a_sidecar_is_recreated(
        pods, node, handler):
    pod = pods("pair", handler)
    shared = pod.empty_dir("shared")
    volume = [(shared, "/shared")]
    server = pod.start("server", SERVER, mounts=volume)
    node.wait_state(server, cri.CONTAINER_RUNNING)
    server_started = node.container_status(server).status.started_at

    first = pod.start("sidecar", SIDECAR, mounts=volume)
    status = node.wait_state(first, cri.CONTAINER_EXITED, timeout=120)
    assert status.exit_code == 0, cri.read_log(pod.log_path("sidecar"))
    assert cri.read_log(pod.log_path("sidecar")) == [
        ("stdout", "sidecar saw served-on-localhost"), ("stdout", "server-page")]
    assert (shared / "from-sidecar").read_text() == "served-on-localhost\n"
    assert node.exec_sync(server, ["cat", "/shared/from-sidecar"]) == \
        (0, "served-on-localhost\n", "")

    # the kubelet re-creates the exited sidecar: a new container of the same pod
    (shared / "from-sidecar").unlink()
    (shared / "stay").touch()
    second = pod.start("sidecar", SIDECAR, mounts=volume)
    assert second != first
    node.wait_state(second, cri.CONTAINER_RUNNING)
    wait_until(lambda: (shared / "from-sidecar").exists(), "the new sidecar's fetch")
    log = pod.log_path("sidecar", attempt=1)
    wait_until(lambda: os.path.exists(log) and cri.read_log(log)[:1] == [
        ("stdout", "sidecar saw served-on-localhost")], "the new sidecar's log line")
    # the server ran on, untouched
    status = node.container_status(server).status
    assert (status.state, status.started_at) == (cri.CONTAINER_RUNNING, server_started)
    assert node.exec_sync(second, ["cat", "/shared/from-server"]) == (0, "server-page\n", "")
    assert node.exec_sync(server, ["hostname"]) == node.exec_sync(second, ["hostname"]) \
        == (0, pod.name + "\n", "")
    kernels = {node.exec_sync(container, ["uname", "-r"]) for container in (server, second)}
    assert len(kernels) == 1        # one kernel for the pod: the host's, or its VM's
    assert (kernels.pop()[1].strip() == os.uname().release) == (handler == "runc")
    assert sorted((c.metadata.name, c.metadata.attempt, c.state)
                  for c in node.list_containers(pod.id)) == [
        ("server", 0, cri.CONTAINER_RUNNING), ("sidecar", 0, cri.CONTAINER_EXITED),
        ("sidecar", 1, cri.CONTAINER_RUNNING)]


@pytest.mark.parametrize("handler", HANDLERS)
def test_a_file_rewritten_in_a_shared_empty_dir_reads_new_at_once(pods, node, handler):
    """Two containers mounting one emptyDir share one filesystem: a file one rewrites
    in place is what the other reads next, and what the host has."""
    pod = pods("coherent", handler)
    shared = pod.empty_dir("shared")
    writer = pod.start("writer", "echo ready; exec sleep 1000", mounts=[(shared, "/shared")])
    reader = pod.start("reader", "echo ready; exec sleep 1000", mounts=[(shared, "/data")])
    for name in ("writer", "reader"):
        wait_until(lambda: ("stdout", "ready") in cri.read_log(pod.log_path(name)),
                   f"{name} to start", timeout=120)
    for version in range(6):
        text = f"version-{version}" + "." * (version % 2) * 100     # its size changes too
        assert node.exec_sync(writer, ["sh", "-c", f"echo {text} > /shared/file"])[0] == 0
        assert node.exec_sync(reader, ["cat", "/data/file"]) == (0, text + "\n", "")
        assert (shared / "file").read_text() == text + "\n"
    assert node.exec_sync(reader, ["sh", "-c", "echo back > /data/reply"])[0] == 0
    assert node.exec_sync(writer, ["cat", "/shared/reply"]) == (0, "back\n", "")


@pytest.mark.parametrize("handler", HANDLERS)
def test_a_container_with_a_terminal_finds_it_in_its_own_dev_pts(pods, node, handler):
    pod = pods("tty", handler)
    main = pod.start("main", 'echo "tty=$(tty)"; exec sleep 1000', tty=True)
    line = wait_until(lambda: next((text.strip() for _, text in
                                    cri.read_log(pod.log_path("main"))
                                    if text.startswith("tty=")), None), "its tty's name",
                      timeout=120)
    assert re.fullmatch(r"tty=/dev/pts/\d+", line), line
    assert node.exec_sync(main, ["test", "-c", line[len("tty="):]])[0] == 0


@pytest.mark.parametrize("handler", HANDLERS)
def test_a_pod_sharing_its_pid_namespace_sees_every_containers_processes(pods, node,
                                                                          handler):
    """shareProcessNamespace: the pause is PID 1 of every container, each sees the
    others' processes, and a container's processes go when its first one ends."""
    pod = pods("shared-pid", handler, share_pid=True)
    first = pod.start("first", "echo ready; exec sleep 1001")
    second = pod.start("second", "sleep 1002 & echo ready; "
                                 "while [ ! -e /go ]; do sleep 0.1; done")
    for name in ("first", "second"):
        wait_until(lambda: ("stdout", "ready") in cri.read_log(pod.log_path(name)),
                   f"{name} to start", timeout=120)
    assert node.exec_sync(first, ["cat", "/proc/1/cmdline"]) == (0, "/pause\0", "")

    def processes():
        code, out, err = node.exec_sync(first, ["ps", "-o", "args"])
        assert code == 0, err
        return out.splitlines()
    assert "sleep 1002" in processes()
    assert node.exec_sync(second, ["touch", "/go"])[0] == 0
    node.wait_state(second, cri.CONTAINER_EXITED, timeout=60)
    listed = wait_until(lambda: (lambda ps: "sleep 1002" not in ps and ps)(processes()),
                        "the exited container's background process to go", timeout=30)
    assert "/pause" in listed and "sleep 1001" in listed


@pytest.mark.parametrize("handler", HANDLERS)
def test_a_pods_memory_limit_holds_its_whole_vm(pods, node, handler):
    """containerd gives the sandbox no limit; the kubelet puts the pod's on the pod's
    cgroup. Under runc a container sees the host's memory; a dkvm pod's VM is sized
    within the pod's limit, which its sandbox's cgroup takes as its own."""
    limit = 640 << 20
    pod = pods("sized", handler, memory_limit=limit)
    main = pod.start("main", "echo ready; exec sleep 1000")
    wait_until(lambda: ("stdout", "ready") in cri.read_log(pod.log_path("main")), "ready",
               timeout=120)
    code, meminfo, _ = node.exec_sync(main, ["cat", "/proc/meminfo"])
    total = int(re.search(r"MemTotal:\s+(\d+) kB", meminfo).group(1)) << 10
    if handler == "runc":
        assert total > limit
        return
    assert 256 << 20 < total < limit
    if Path("/sys/fs/cgroup/memory").is_dir():  # cgroup v1 (these hosts)
        sandbox_cgroup = Path("/sys/fs/cgroup/memory", cri.CGROUP_PARENT.lstrip("/"),
                              f"pod{pod.uid}", pod.id)
        assert int((sandbox_cgroup / "memory.limit_in_bytes").read_text()) == limit


# --- pod deletion -------------------------------------------------------------------

def host_state(ids=()):
    """What a pod can leave on the host: processes in the pods' cgroups, mounts, network
    namespaces, veths on the pod bridge, containerd's and CNI's per-pod files, NAT rules
    for hostPorts, and anything naming one of `ids` (the pod's and its containers')."""
    processes = set()            # the pod cgroups that hold a process
    for proc in Path("/proc").iterdir():
        try:
            cgroups = (proc / "cgroup").read_text() if proc.name.isdigit() else ""
        except OSError:
            continue
        processes |= set(re.findall(re.escape(cri.CGROUP_PARENT) + r"/pod[0-9a-f-]+", cgroups))
    places = (str(cri.ROOT), str(cri.STATE), str(cri.KUBELET_DIR), "/run/netns/cni-")
    mounts = sorted(line.split()[4] for line in open("/proc/self/mountinfo")
                    if any(place in line for place in places))
    netns = sorted(name for name in os.listdir("/run/netns") if name.startswith("cni-")) \
        if Path("/run/netns").exists() else []
    veths = sorted(link.name for link in Path("/sys/class/net").iterdir()
                   if (link / "master").exists()
                   and os.path.basename(os.readlink(link / "master")) == cri.BRIDGE)
    files = []
    for directory in (cri.ROOT / "io.containerd.grpc.v1.cri" / "sandboxes",
                      cri.ROOT / "io.containerd.grpc.v1.cri" / "containers",
                      cri.STATE / "io.containerd.grpc.v1.cri" / "sandboxes",
                      cri.STATE / "io.containerd.grpc.v1.cri" / "containers",
                      cri.STATE / "io.containerd.runtime.v2.task" / cri.NAMESPACE,
                      cri.IPAM_DIR / cri.CNI_NETWORK, Path("/var/lib/cni/results"),
                      cri.LOG_DIR, cri.PODS_DIR):
        if directory.exists():
            files += [str(directory / name) for name in os.listdir(directory)]
    nat = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True,
                         timeout=30).stdout.splitlines()
    cgroups = [str(path) for path in Path("/sys/fs/cgroup").glob(
        f"*{cri.CGROUP_PARENT}/*") if path.is_dir()]
    state = {"processes": sorted(processes), "mounts": mounts, "netns": netns,
             "veths": veths, "files": sorted(files), "cgroups": sorted(cgroups),
             "hostport-rules": sorted(line for line in nat if "CNI-DN-" in line)}
    state["naming-the-pod"] = sorted(
        f"{kind}: {item}" for kind, items in state.items() for item in items
        if any(i in str(item) for i in ids))
    return state


@pytest.mark.parametrize("handler", HANDLERS)
def test_deleting_a_pod_leaves_nothing_on_the_host(node, handler):
    before = host_state()
    pod = cri.Pod(node, f"gone-{handler}", port_mappings=[(8080, 31180)])
    server = sidecar = "no-container-yet"
    try:
        pod.run(handler)
        volume = [(pod.empty_dir("shared"), "/shared")]
        server = pod.start("server", SERVER, mounts=volume)
        sidecar = pod.start("sidecar", "touch /shared/x; exec sleep 1000", mounts=volume)
        for container in (server, sidecar):
            node.wait_state(container, cri.CONTAINER_RUNNING)
        during = host_state()
        assert len(during["processes"]) > len(before["processes"])
        assert len(during["veths"]) == len(before["veths"]) + 1
        assert len(during["netns"]) == len(before["netns"]) + 1
    finally:
        pod.delete()
    after = host_state(ids=(pod.id, server, sidecar, pod.uid))
    assert after.pop("naming-the-pod") == []
    assert after == {key: value for key, value in before.items() if key != "naming-the-pod"}
