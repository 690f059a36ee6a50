"""The container's NICs and a tap for each, by ioctl on the container's own network
namespace: all QEMU needs to start, so that it boots while pyroute2 (a tenth of a
second to import) hands the NICs' addresses and frames over (plumbing)."""
import fcntl
import os
import socket
import struct

from dkvm.schema import Interface

TAP_PREFIX = "dkvm-tap"
ARPHRD_ETHER = 1
NO_MAC = "00:00:00:00:00:00"
IFF_UP = 0x1
IFF_TAP = 0x0002
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
SIOCGIFMTU, SIOCSIFMTU = 0x8921, 0x8922
SIOCGIFHWADDR = 0x8927
TUNSETIFF, TUNSETPERSIST = 0x400454CA, 0x400454CB
TUNSETOWNER, TUNSETGROUP = 0x400454CC, 0x400454CE
IFREQ_SIZE = 40             # struct ifreq: the name (16 bytes), then a 24-byte union


def tap_name(number):
    return f"{TAP_PREFIX}{number}"


def is_guest_nic(name, link_type, mac):
    """An Ethernet link with an address, neither lo nor one of our taps. A host module's
    tunnels in every namespace are other link types (ipip's tunl0, ip_gre's gre0) or,
    for ip_gre's gretap0 and erspan0, Ethernet with no address: none is a NIC."""
    return (link_type == ARPHRD_ETHER and mac != NO_MAC and name != "lo"
            and not name.startswith(TAP_PREFIX))


def guest_nics():
    """The container's NICs (is_guest_nic), by index: each as an Interface with its
    name, index, MAC and MTU (plumbing.describe adds the rest)."""
    nics = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for index, name in sorted(socket.if_nameindex()):
            try:
                family, mac = hardware_address(sock, name)
                mtu = struct.unpack_from("i", ifreq(sock, SIOCGIFMTU, name), 16)[0]
            except OSError:
                continue                # gone since it was listed
            if is_guest_nic(name, family, mac):
                nics.append(Interface(name=name, index=index, mac=mac, mtu=mtu))
    return nics


def hardware_address(sock, name):
    reply = ifreq(sock, SIOCGIFHWADDR, name)         # a sockaddr: family, then the address
    family, = struct.unpack_from("H", reply, 16)
    return family, ":".join(f"{byte:02x}" for byte in reply[18:24])


def create_tap(name, mtu):
    """A persistent tap owned by root, up with `mtu`, so that QEMU attaches to it by
    name without CAP_NET_ADMIN (it runs with no capabilities: processes.start_qemu);
    its index."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF,
                    struct.pack("16sH", name.encode(), IFF_TAP).ljust(IFREQ_SIZE, b"\0"))
        fcntl.ioctl(fd, TUNSETOWNER, 0)
        fcntl.ioctl(fd, TUNSETGROUP, 0)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq(sock, SIOCSIFMTU, name, struct.pack("i", mtu))
        flags, = struct.unpack_from("H", ifreq(sock, SIOCGIFFLAGS, name), 16)
        ifreq(sock, SIOCSIFFLAGS, name, struct.pack("H", flags | IFF_UP))
    return socket.if_nametoindex(name)


def ifreq(sock, request, name, data=b""):
    """One interface ioctl on `name`; the struct ifreq the kernel returns."""
    request_bytes = (name.encode()[:15].ljust(16, b"\0") + data).ljust(IFREQ_SIZE, b"\0")
    return fcntl.ioctl(sock.fileno(), request, request_bytes)
