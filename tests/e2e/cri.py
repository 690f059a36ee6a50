"""A small kubelet for the e2e tests: a private containerd with its CRI plugin and a CNI
bridge, driven over the CRI API (gRPC, and the streaming server for exec and
port-forward) the way the kubelet drives it. Runtime handlers: `runc` (the oracle) and
`dkvm` (containerd's runc shim with DKVM's runtime as its runc binary, as `dkvm install`
registers it). Every call and every wait has a bound.

The CRI Python stubs are generated from tests/fixtures/cri-api/api.proto once per
session (grpc_tools.protoc), into a temporary directory: nothing generated is committed.
"""
import fcntl
import importlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from dockerutil import BUSYBOX, PATH_ENV, busybox_tree, docker_import, image_exists, sh
from waiting import poll, wait_until

HERE = Path(__file__).resolve().parent
PROTO = HERE.parent / "fixtures" / "cri-api" / "api.proto"

# containerd's own places: a root of its own that outlives the session (the imported
# images stay, so later sessions need no docker), and the state dir at the default
# path because DKVM looks a pod's sandbox bundle up under
# /run/containerd/io.containerd.runtime.v2.task/k8s.io (dockerd's containerd keeps its
# state under /var/run/docker/containerd; no other containerd runs here)
ROOT = Path("/var/lib/dkvm-test-containerd")
STATE = Path("/run/containerd")
RUN_DIR = Path("/run/dkvm-test-containerd")           # socket, config, CNI config, log
SOCKET = RUN_DIR / "containerd.sock"
NAMESPACE = "k8s.io"                                  # the CRI plugin's namespace
# what the kubelet keeps per pod: logs (its /var/log/pods) and volumes (emptyDir)
KUBELET_DIR = Path("/var/lib/dkvm-test-kubelet")
LOG_DIR = KUBELET_DIR / "logs"
PODS_DIR = KUBELET_DIR / "pods"
CGROUP_PARENT = "/dkvm-test-kubepods"                 # the kubelet's /kubepods (cgroupfs)

# the CNI network: a bridge and a subnet nothing else on the test hosts uses (docker0 is
# 172.17/16, Podman's 10.88/16, the other e2e tests' networks 10.123-125.x and 10.231.7)
BRIDGE = "dkvm-cni0"
SUBNET, GATEWAY = "10.244.87.0/24", "10.244.87.1"
CNI_NETWORK = "dkvm-test-pods"
CNI_BIN_DIR = "/usr/lib/cni"                          # Debian's containernetworking-plugins
IPAM_DIR = ROOT / "cni-ipam"                          # host-local's leases, under our root

PAUSE = "dkvm-test-pause"
PAUSE_REF = f"docker.io/library/{PAUSE}:latest"       # where `docker save` names it
BUSYBOX_REF = f"docker.io/library/{BUSYBOX}:latest"
HANDLERS = {"runc": None, "dkvm": "/usr/local/bin/dkvm-runtime"}   # handler -> BinaryName

CALL_TIMEOUT = 60          # one CRI call that does not stop or start a VM
START_TIMEOUT = 180        # RunPodSandbox / StartContainer: a VM boots in 3-10 s under TCG
DOCKER_LOCK = "/tmp/dkvm-docker.lock"

CONTAINER_RUNNING, CONTAINER_EXITED = 1, 2   # runtime.v1.ContainerState


def stubs():
    """The CRI API's generated modules (api_pb2, api_pb2_grpc), made once per process."""
    if "api_pb2_grpc" not in sys.modules:
        with tempfile.TemporaryDirectory(prefix="dkvm-cri-stubs-") as out:
            subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}",
                            f"--python_out={out}", f"--grpc_python_out={out}", str(PROTO)],
                           check=True, capture_output=True, timeout=120)
            sys.path.insert(0, out)
            try:
                for module in ("api_pb2", "api_pb2_grpc"):
                    importlib.import_module(module)
            finally:
                sys.path.remove(out)
    return sys.modules["api_pb2"], sys.modules["api_pb2_grpc"]


# --- the private containerd ---------------------------------------------------------

def containerd_config():
    runtimes = ""
    for handler, binary in HANDLERS.items():
        runtimes += (f'[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{handler}]\n'
                     '  runtime_type = "io.containerd.runc.v2"\n')
        if binary:
            runtimes += (f'[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.'
                         f'{handler}.options]\n  BinaryName = "{binary}"\n')
    return f"""version = 2
root = "{ROOT}"
state = "{STATE}"
[grpc]
  address = "{SOCKET}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_REF}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_tls_streaming = false
  # the sandbox asks for oom_score_adj -998, which a host that is itself confined
  # (these test machines) refuses: clamp it to containerd's own, as nested set-ups do
  restrict_oom_score_adj = true
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
  snapshotter = "overlayfs"
{runtimes}[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{RUN_DIR / 'cni'}"
  max_conf_num = 1
"""


def cni_conflist():
    """The bridge as a cluster's simplest CNI set-up has it: host-local IPAM, hostPort
    by portmap, and the pod's loopback."""
    return {"cniVersion": "0.4.0", "name": CNI_NETWORK, "plugins": [
        {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
         "hairpinMode": True,
         "ipam": {"type": "host-local", "dataDir": str(IPAM_DIR),
                  "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]],
                  "routes": [{"dst": "0.0.0.0/0"}]}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
        {"type": "loopback"}]}


class Containerd:
    """The session's containerd: started with its own config, stopped with every pod
    it ran removed, its bridge deleted and nothing of it mounted."""

    def __init__(self):
        self.process = None
        self.log = RUN_DIR / "containerd.log"

    def start(self):
        if SOCKET.exists() and subprocess.run(
                ["ctr", "-a", str(SOCKET), "version"], capture_output=True,
                timeout=10).returncode == 0:
            raise RuntimeError(f"a containerd already serves {SOCKET}: an earlier session's "
                               "was not stopped (kill it and run again)")
        (RUN_DIR / "cni").mkdir(parents=True, exist_ok=True)
        for path in (ROOT, IPAM_DIR, LOG_DIR, PODS_DIR):
            path.mkdir(parents=True, exist_ok=True)
        config = RUN_DIR / "config.toml"
        config.write_text(containerd_config())
        (RUN_DIR / "cni" / "10-dkvm-test.conflist").write_text(json.dumps(cni_conflist()))
        SOCKET.unlink(missing_ok=True)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(["containerd", "--config", str(config)],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        wait_until(lambda: self.process.poll() is not None or (
            SOCKET.exists() and "Start streaming server" in self.log.read_text()),
            "the private containerd to serve CRI", timeout=60)
        if self.process.poll() is not None:
            raise RuntimeError(f"containerd exited: {self.log.read_text()[-2000:]}")

    def stop(self):
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, timeout=30)
        remove_hostport_chains()
        remove_cgroup(CGROUP_PARENT)
        SOCKET.unlink(missing_ok=True)

    def ctr(self, *args, timeout=240, input=None):
        return subprocess.run(["ctr", "-a", str(SOCKET), "-n", NAMESPACE, *args],
                              capture_output=True, timeout=timeout, check=True, input=input)

    def has_image(self, ref):
        return ref in self.ctr("images", "ls", "-q").stdout.decode().split()

    def import_images(self):
        """The pause and busybox images, from dockerd (no registry on the test hosts);
        dockerd is only asked, under the docker lock, when this containerd's store
        (which outlives the session) lacks one."""
        missing = [ref for ref in (PAUSE_REF, BUSYBOX_REF) if not self.has_image(ref)]
        if not missing:
            return
        with docker_lock():
            ensure_docker_images()
            for tag, ref in ((PAUSE, PAUSE_REF), (BUSYBOX, BUSYBOX_REF)):
                if ref in missing:
                    saved = subprocess.run(["docker", "save", tag], capture_output=True,
                                           check=True, timeout=240).stdout
                    self.ctr("images", "import", "-", input=saved)


# portmap's chains in the nat table, made on the first hostPort and kept by it for the
# next (one node's CNI plugins share them); ours to remove once no pod has a hostPort
HOSTPORT_CHAINS = ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-MASQ", "CNI-HOSTPORT-SETMARK")


def remove_hostport_chains():
    rules = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True,
                           timeout=30).stdout.splitlines()
    if any(rule.startswith("-A CNI-HOSTPORT-DNAT ") for rule in rules):
        return          # a pod's hostPort is still there: not ours alone
    for rule in rules:
        words = shlex.split(rule)
        if words[0] == "-A" and words[-1] in HOSTPORT_CHAINS \
                and words[1] not in HOSTPORT_CHAINS:
            subprocess.run(["iptables", "-t", "nat", "-D", *words[1:]], capture_output=True,
                           timeout=30)
    for flag in ("-F", "-X"):
        for chain in HOSTPORT_CHAINS:
            subprocess.run(["iptables", "-t", "nat", flag, chain], capture_output=True,
                           timeout=30)


def ensure_docker_images():
    if not image_exists(BUSYBOX):
        with tempfile.TemporaryDirectory() as tmp:
            busybox_tree(Path(tmp))
            docker_import(Path(tmp), BUSYBOX, [PATH_ENV])
    if not image_exists(PAUSE):
        with tempfile.TemporaryDirectory() as tmp:
            sh("gcc", "-static", "-O2", "-o", f"{tmp}/pause", str(HERE / "images" / "pause.c"))
            docker_import(Path(tmp), PAUSE, ['ENTRYPOINT ["/pause"]'])


class docker_lock:
    """The suite's docker lock, unless a process this one runs under already holds it
    (the lead's `flock /tmp/dkvm-docker.lock pytest ...`): taking it again would wait on
    ourselves. Bounded."""

    def __enter__(self):
        self.fd = os.open(DOCKER_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        if lock_held_by_an_ancestor(self.fd):
            return self
        def taken():
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
        wait_until(taken, f"{DOCKER_LOCK} to be free", timeout=900, interval=0.5)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)       # releases the flock if we took it


def lock_held_by_an_ancestor(fd):
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = {int(fields[4]) for fields in (line.split() for line in open("/proc/locks"))
               if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode}
    pid = os.getpid()
    while pid > 1:
        if pid in holders:
            return True
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


# --- the CRI client -----------------------------------------------------------------

class Cri:
    """The CRI calls the kubelet makes, each with a deadline; remembers the pods it ran
    so that a session can remove them whatever a test left."""

    def __init__(self, socket=SOCKET):
        import grpc
        self.pb, grpc_stubs = stubs()
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.runtime = grpc_stubs.RuntimeServiceStub(self.channel)
        self.images = grpc_stubs.ImageServiceStub(self.channel)

    def close(self):
        self.channel.close()

    def version(self):
        return self.runtime.Version(self.pb.VersionRequest(), timeout=CALL_TIMEOUT)

    def image_status(self, ref):
        return self.images.ImageStatus(self.pb.ImageStatusRequest(
            image=self.pb.ImageSpec(image=ref)), timeout=CALL_TIMEOUT).image

    def run_pod_sandbox(self, config, runtime_handler):
        return self.runtime.RunPodSandbox(self.pb.RunPodSandboxRequest(
            config=config, runtime_handler=runtime_handler), timeout=START_TIMEOUT).pod_sandbox_id

    def pod_sandbox_status(self, pod_id, verbose=False):
        return self.runtime.PodSandboxStatus(self.pb.PodSandboxStatusRequest(
            pod_sandbox_id=pod_id, verbose=verbose), timeout=CALL_TIMEOUT)

    def list_pod_sandboxes(self):
        return self.runtime.ListPodSandbox(self.pb.ListPodSandboxRequest(),
                                           timeout=CALL_TIMEOUT).items

    def stop_pod_sandbox(self, pod_id):
        self.runtime.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                    timeout=START_TIMEOUT)

    def remove_pod_sandbox(self, pod_id):
        self.runtime.RemovePodSandbox(self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                      timeout=START_TIMEOUT)

    def create_container(self, pod_id, config, sandbox_config):
        return self.runtime.CreateContainer(self.pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox_config),
            timeout=START_TIMEOUT).container_id

    def start_container(self, container_id):
        self.runtime.StartContainer(self.pb.StartContainerRequest(container_id=container_id),
                                    timeout=START_TIMEOUT)

    def container_status(self, container_id, verbose=False):
        return self.runtime.ContainerStatus(self.pb.ContainerStatusRequest(
            container_id=container_id, verbose=verbose), timeout=CALL_TIMEOUT)

    def list_containers(self, pod_id=None):
        flt = self.pb.ContainerFilter(pod_sandbox_id=pod_id or "")
        return self.runtime.ListContainers(self.pb.ListContainersRequest(filter=flt),
                                           timeout=CALL_TIMEOUT).containers

    def stop_container(self, container_id, timeout):
        """StopContainer with the grace period `timeout` (s): the stop signal, then
        SIGKILL when it is up."""
        self.runtime.StopContainer(self.pb.StopContainerRequest(
            container_id=container_id, timeout=timeout), timeout=timeout + START_TIMEOUT)

    def remove_container(self, container_id):
        self.runtime.RemoveContainer(self.pb.RemoveContainerRequest(container_id=container_id),
                                     timeout=START_TIMEOUT)

    def exec_sync(self, container_id, cmd, timeout=30):
        """(exit code, stdout, stderr) of `cmd`, bounded by `timeout` inside containerd."""
        resp = self.runtime.ExecSync(self.pb.ExecSyncRequest(
            container_id=container_id, cmd=cmd, timeout=timeout), timeout=timeout + CALL_TIMEOUT)
        return resp.exit_code, resp.stdout.decode(), resp.stderr.decode()

    def exec_url(self, container_id, cmd, stdin=False, tty=False):
        return self.runtime.Exec(self.pb.ExecRequest(
            container_id=container_id, cmd=cmd, stdin=stdin, tty=tty, stdout=True,
            stderr=not tty), timeout=CALL_TIMEOUT).url

    def port_forward_url(self, pod_id, port):
        return self.runtime.PortForward(self.pb.PortForwardRequest(
            pod_sandbox_id=pod_id, port=[port]), timeout=CALL_TIMEOUT).url

    def reopen_container_log(self, container_id):
        self.runtime.ReopenContainerLog(self.pb.ReopenContainerLogRequest(
            container_id=container_id), timeout=CALL_TIMEOUT)

    def wait_state(self, container_id, state, timeout=START_TIMEOUT):
        """The container's status once it is in `state` (bounded)."""
        status = poll(lambda: self.container_status(container_id).status,
                      lambda s: s.state == state, timeout)
        assert status.state == state, f"{container_id[:12]} is {status}, not in state {state}"
        return status

    def remove_every_pod(self):
        """What a drained node does: every pod stopped and removed, with the kubelet's
        directories and cgroup for it."""
        for pod in self.list_pod_sandboxes():
            self.stop_pod_sandbox(pod.id)
            self.remove_pod_sandbox(pod.id)
            meta = pod.metadata
            shutil.rmtree(PODS_DIR / meta.uid, ignore_errors=True)
            shutil.rmtree(LOG_DIR / f"{meta.namespace}_{meta.name}_{meta.uid}",
                          ignore_errors=True)
            remove_cgroup(f"{CGROUP_PARENT}/pod{meta.uid}")


# --- pods and containers as the kubelet configures them -----------------------------

class Pod:
    """A pod's sandbox config and the kubelet's directories for it (log directory,
    emptyDir volumes), and its containers' configs."""

    def __init__(self, cri, name, port_mappings=(), share_pid=False, memory_limit=0):
        """`memory_limit`: bytes the kubelet puts on the pod's cgroup (its containers'
        limits and the RuntimeClass's overhead)."""
        pb = cri.pb
        self.memory_limit = memory_limit
        self.cri, self.name, self.uid = cri, name, str(uuid.uuid4())
        self.namespace = "default"
        self.log_dir = LOG_DIR / f"{self.namespace}_{name}_{self.uid}"
        self.pod_dir = PODS_DIR / self.uid
        self.log_dir.mkdir(parents=True)
        self.pod_dir.mkdir(parents=True)
        (self.pod_dir / "etc-hosts").write_text("127.0.0.1\tlocalhost\n")
        pid_mode = pb.POD if share_pid else pb.CONTAINER
        self.namespaces = pb.NamespaceOption(network=pb.POD, pid=pid_mode, ipc=pb.POD)
        self.config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=self.uid, namespace=self.namespace),
            hostname=name, log_directory=str(self.log_dir),
            port_mappings=[pb.PortMapping(protocol=pb.TCP, container_port=inner,
                                          host_port=outer) for inner, outer in port_mappings],
            labels={"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace":
                    self.namespace, "io.kubernetes.pod.uid": self.uid},
            annotations={"kubernetes.io/config.source": "api"},
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=f"{CGROUP_PARENT}/pod{self.uid}",
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=self.namespaces)))
        self.id = None
        self.attempts = {}

    def run(self, handler):
        if self.memory_limit:
            limit_pod_cgroup(self.config.linux.cgroup_parent, self.memory_limit)
        self.id = self.cri.run_pod_sandbox(self.config, handler)
        return self.id

    def empty_dir(self, volume):
        """An emptyDir volume: a directory of the pod's on the host, bind-mounted into
        each container that names it."""
        path = self.pod_dir / "volumes" / "kubernetes.io~empty-dir" / volume
        path.mkdir(parents=True, exist_ok=True)
        return path

    def container_config(self, name, script, image=BUSYBOX_REF, mounts=(), tty=False,
                         stdin=False):
        """Container `name`'s config as the kubelet makes it: its log under the pod's
        log directory (NAME/ATTEMPT.log, attempt counting re-creations), /etc/hosts and
        the termination log mounted from the pod's directory, `mounts` [(host dir,
        container path)] as volumes."""
        pb = self.cri.pb
        attempt = self.attempts[name] = self.attempts.get(name, -1) + 1
        (self.log_dir / name).mkdir(exist_ok=True)
        termination = self.pod_dir / "containers" / name / uuid.uuid4().hex[:8]
        termination.parent.mkdir(parents=True, exist_ok=True)
        termination.touch()
        all_mounts = [pb.Mount(container_path="/etc/hosts",
                               host_path=str(self.pod_dir / "etc-hosts")),
                      pb.Mount(container_path="/dev/termination-log", host_path=str(termination))]
        all_mounts += [pb.Mount(container_path=inside, host_path=str(host))
                       for host, inside in mounts]
        return pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=attempt),
            image=pb.ImageSpec(image=image), command=["sh", "-c", script],
            envs=[pb.KeyValue(key="POD_NAME", value=self.name)],
            mounts=all_mounts, log_path=f"{name}/{attempt}.log", tty=tty, stdin=stdin,
            labels={"io.kubernetes.container.name": name, "io.kubernetes.pod.name": self.name,
                    "io.kubernetes.pod.namespace": self.namespace,
                    "io.kubernetes.pod.uid": self.uid},
            annotations={"io.kubernetes.container.restartCount": str(attempt),
                         "io.kubernetes.container.terminationMessagePath":
                         "/dev/termination-log"},
            linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
                namespace_options=self.namespaces)))

    def start(self, name, script, **kwargs):
        """Container `name` running `sh -c script`, created and started; its id."""
        container_id = self.cri.create_container(
            self.id, self.container_config(name, script, **kwargs), self.config)
        self.cri.start_container(container_id)
        return container_id

    def log_path(self, name, attempt=None):
        return self.log_dir / name / f"{self.attempts[name] if attempt is None else attempt}.log"

    def ip(self):
        return self.cri.pod_sandbox_status(self.id).status.network.ip

    def delete(self):
        """What the kubelet does when the pod is deleted: the sandbox stopped and
        removed (its containers with it), then the pod's own directories and cgroup."""
        if self.id:
            self.cri.stop_pod_sandbox(self.id)
            self.cri.remove_pod_sandbox(self.id)
        shutil.rmtree(self.pod_dir, ignore_errors=True)
        shutil.rmtree(self.log_dir, ignore_errors=True)
        remove_cgroup(f"{CGROUP_PARENT}/pod{self.uid}")


def limit_pod_cgroup(path, memory_limit):
    """The pod's cgroup with its memory limit, made before its sandbox as the kubelet
    makes it (cgroup v1's memory hierarchy, or the v2 tree)."""
    base = Path("/sys/fs/cgroup")
    v1 = (base / "memory").is_dir()
    target = (base / "memory" if v1 else base) / path.lstrip("/")
    target.mkdir(parents=True, exist_ok=True)
    (target / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(memory_limit))


def remove_cgroup(path):
    """The pod's cgroup in every v1 hierarchy (or the v2 tree), as the kubelet removes
    it once the pod's containers are gone."""
    base = Path("/sys/fs/cgroup")
    for hierarchy in [base] + [p for p in base.iterdir() if p.is_dir() and not p.is_symlink()]:
        target = hierarchy / path.lstrip("/")
        if target.is_dir():
            try:
                target.rmdir()
            except OSError:
                pass


# --- the CRI log format -------------------------------------------------------------

def read_log(path):
    """A CRI log file as [(stream, text)] per complete line: each record is
    `TIMESTAMP STREAM TAG CONTENT`, TAG F (full) or P (partial: continued by the next
    record of that stream)."""
    lines, partial = [], {}
    for record in Path(path).read_text().splitlines():
        timestamp, stream, tag, content = (record.split(" ", 3) + [""])[:4]
        assert stream in ("stdout", "stderr") and tag in ("F", "P"), record
        partial[stream] = partial.get(stream, "") + content
        if tag == "F":
            lines.append((stream, partial.pop(stream)))
    return lines


# --- the streaming server (exec, port-forward) over WebSocket -----------------------

STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)   # channel.k8s.io's channels


class ExecSession:
    """`docker exec -i[t]` over the CRI streaming server: the v4 channel protocol of
    WebSocket (one byte of channel, then data; the error channel carries the exit
    status as a JSON Status)."""

    def __init__(self, url, timeout=START_TIMEOUT):
        import websocket
        self.ws = websocket.create_connection(url.replace("http://", "ws://", 1),
                                              subprotocols=["v4.channel.k8s.io"],
                                              timeout=timeout)
        self.out = {STDOUT: b"", STDERR: b""}
        self.status = None
        self.closed = False

    def send(self, data):
        self.ws.send_binary(bytes([STDIN]) + (data.encode() if isinstance(data, str) else data))

    def resize(self, rows, cols):
        self.ws.send_binary(bytes([RESIZE]) + json.dumps({"Width": cols, "Height": rows})
                            .encode())

    def _receive(self, timeout):
        import websocket
        self.ws.settimeout(timeout)
        try:
            opcode, data = self.ws.recv_data()
        except websocket.WebSocketTimeoutException:
            return
        except websocket.WebSocketConnectionClosedException:
            self.closed = True
            return
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            self.closed = True
        elif data:
            channel, payload = data[0], data[1:]
            if channel == ERROR:
                self.status = json.loads(payload) if payload else None
            elif channel in self.out:
                self.out[channel] += payload

    def read_until(self, condition, what, timeout=60):
        """Output until `condition(stdout text)` holds (bounded)."""
        deadline = time.monotonic() + timeout
        while not condition(self.stdout):
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                raise AssertionError(f"no {what} in the exec's output: {self.stdout!r}")
            self._receive(min(left, 1.0))
        return self.stdout

    def wait(self, timeout=60):
        """The exit code, once the stream has closed (bounded)."""
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self._receive(min(deadline - time.monotonic(), 1.0))
        assert self.closed, f"the exec did not end within {timeout}s: {self.stdout!r}"
        self.ws.close()
        return exit_code(self.status)

    @property
    def stdout(self):
        return self.out[STDOUT].decode(errors="replace")

    @property
    def stderr(self):
        return self.out[STDERR].decode(errors="replace")


def exit_code(status):
    """The exit code in the error channel's Status: Success is 0; a non-zero exit is
    a Failure whose cause ExitCode carries it."""
    if status is None:
        return None
    if status.get("status") == "Success":
        return 0
    for cause in status.get("details", {}).get("causes", []):
        if cause.get("reason") == "ExitCode":
            return int(cause["message"])
    raise AssertionError(f"the exec failed: {status}")


def port_forward(url, port, request, timeout=60):
    """Bytes a pod's `port` answers to `request`, through the CRI streaming server's
    port-forward."""
    received, errors = port_forward_exchange(url, port, request, timeout)
    assert not errors, f"port-forward error: {errors!r}"
    return received


def port_forward_exchange(url, port, request, timeout=60):
    """What a port-forward gives for `request`: the bytes the port answered, and the
    error channel's (WebSocket: data and error channels per port, each starting with
    the port number as two little-endian bytes)."""
    import websocket
    ws = websocket.create_connection(url.replace("http://", "ws://", 1) + f"?port={port}",
                                     subprotocols=["v4.channel.k8s.io"], timeout=timeout)
    try:
        ws.send_binary(bytes([0]) + request)
        received, errors, seen = b"", b"", {0: False, 1: False}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                opcode, data = ws.recv_data()
            except (websocket.WebSocketConnectionClosedException,
                    websocket.WebSocketTimeoutException, ConnectionError):
                break           # (the server may close before the client's close frame)
            if opcode == websocket.ABNF.OPCODE_CLOSE or not data:
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
                continue
            channel, payload = data[0], data[1:]
            if channel in seen and not seen[channel]:    # the port-number prefix
                seen[channel], payload = True, payload[2:]
            if channel == 0:
                received += payload
            elif channel == 1:
                errors += payload
        return received, errors
    finally:
        ws.close()
