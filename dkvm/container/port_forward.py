"""A pod's port-forward (`kubectl port-forward`), on the sandbox's container side.

containerd forwards a port by dialling localhost:PORT inside the pod's network
namespace, but the pod's listening sockets are the guest's: its interfaces went into
the VM, and only the loopback stays in the namespace. So the sandbox redirects every
TCP connection to 127.0.0.1 there (one nftables rule, in the pod's namespace only,
which goes with it) to a listener of its own, and relays each on a channel as an
exec's (exec_relay), for the port it was meant for (SO_ORIGINAL_DST): the guest
connects to its own localhost:PORT (guest.port_forward). Where nothing listens in
the guest, or the server resets, the connection is reset: containerd reports an
error, as its refused dial under runc would.

The relays are threads: the supervisor's loop serves them as it serves exec relays,
through the exec socket. Nothing here reads what the guest sends but the relay.
"""
import socket
import struct
import threading

from dkvm import log, wire
from dkvm.container import exec_relay
from dkvm.container.net.pyroute2_light import light_pyroute2
from dkvm.errors import DkvmError
from dkvm.schema import Process

TABLE, CHAIN = "dkvm", "port-forward"
NFPROTO_IPV4 = 2
NAT_OUTPUT_PRIORITY = -100          # dstnat: before the routing decision
NFT_PAYLOAD_NETWORK_HEADER, NFT_REG_1, NFT_CMP_EQ = 1, 1, 0
IPPROTO_TCP = 6
SO_ORIGINAL_DST = 80                # linux/netfilter_ipv4.h
SOCKADDR_IN = struct.Struct("!2xH4s8x")
MOST_FORWARDS = 16                  # connections relayed at once; the next are reset
BACKLOG = 64
CONNECT_WAIT = 30                   # the multiplexer's socket, the VM still starting
CLIENT_GONE = -1


def loopback_redirect(port):
    """The nftables expressions of `ip protocol tcp ip daddr 127.0.0.1 redirect to
    :port`, as pyroute2 sends them."""
    from collections import OrderedDict
    from pyroute2.nftables.expressions import genex

    def load(offset, length):
        return genex("payload", OrderedDict(dreg=NFT_REG_1, base=NFT_PAYLOAD_NETWORK_HEADER,
                                            offset=offset, len=length))

    def equals(data):
        return genex("cmp", OrderedDict(sreg=NFT_REG_1, op=NFT_CMP_EQ,
                                        data={"attrs": [("NFTA_DATA_VALUE", data)]}))
    to_port = genex("immediate", OrderedDict(
        dreg=NFT_REG_1, data={"attrs": [("NFTA_DATA_VALUE", struct.pack("!H", port))]}))
    return [[load(9, 1), equals(bytes([IPPROTO_TCP]))],
            [load(16, 4), equals(socket.inet_aton("127.0.0.1"))],
            [to_port, genex("redir", OrderedDict(reg_proto_min=NFT_REG_1))]]


def redirect_loopback(port):
    """In this network namespace, every TCP connection to 127.0.0.1 goes to `port`."""
    light_pyroute2()
    from pyroute2.nftables.main import NFTables
    with NFTables(nfgen_family=NFPROTO_IPV4) as nft:
        nft.table("add", name=TABLE)
        nft.chain("add", table=TABLE, name=CHAIN, hook="output", type="nat",
                  priority=NAT_OUTPUT_PRIORITY)
        nft.rule("add", table=TABLE, chain=CHAIN, expressions=loopback_redirect(port))


def original_port(conn):
    """The port a redirected connection was dialled to."""
    return SOCKADDR_IN.unpack(conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST,
                                              SOCKADDR_IN.size))[0]


def reset(conn):
    """Close with a reset (RST), as a refused or reset connection ends for the client."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    conn.close()


class ForwardRelay(exec_relay.ExecRelay):
    """An exec relay whose stdin and stdout are a forwarded connection."""

    def __init__(self, sock, conn, port):
        super().__init__(sock, Process(), port=port)
        self.stdin = self.conn = conn

    def read_input(self, limit):
        try:
            return self.conn.recv(limit)
        except OSError:
            return b""

    def write_output(self, ftype, data):
        if ftype == wire.STDERR:            # the guest's word on why it could not connect
            log.warn(f"port-forward: {log.printable(data.decode(errors='replace')).strip()}")
            return
        try:
            self.conn.sendall(data)
        except OSError:
            self.status = CLIENT_GONE       # the relay's end: the guest closes its side


class PortForwarding:
    def __init__(self, exec_socket):
        self.exec_socket = exec_socket
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(BACKLOG)
        self.slots = threading.BoundedSemaphore(MOST_FORWARDS)

    def start(self):
        """Redirect, then serve in a thread. (pyroute2 is imported in this thread: its
        package imported in two threads at once can fail half-made.)"""
        try:
            redirect_loopback(self.listener.getsockname()[1])
        except Exception as err:
            log.warn(f"port-forward into this pod is off: cannot redirect its localhost "
                     f"({err})")
            self.listener.close()
            return
        threading.Thread(target=self.serve, name="port-forward", daemon=True).start()

    def serve(self):
        while True:
            conn, _ = self.listener.accept()
            if self.slots.acquire(blocking=False):
                threading.Thread(target=self.forward, args=(conn,), daemon=True).start()
            else:
                log.warn(f"port-forward: more than {MOST_FORWARDS} connections at once; "
                         "this one is reset")
                reset(conn)

    def forward(self, conn):
        status = None
        try:
            port = original_port(conn)
            sock = exec_relay.connect(self.exec_socket, CONNECT_WAIT, "port-forward")
            try:
                status = ForwardRelay(sock, conn, port).run()
            finally:
                sock.close()
        except (DkvmError, OSError) as err:
            log.warn(f"port-forward: {getattr(err, 'message', err)}")
        finally:
            if status == 0:
                conn.close()
            else:
                reset(conn)
            self.slots.release()
