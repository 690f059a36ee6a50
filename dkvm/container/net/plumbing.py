"""The container side of networking: each of the container's interfaces hands its
identity (MAC, addresses, MTU, routes) to the VM and becomes plumbing.

A tap per interface, joined to it by tc mirred redirects on both ingresses (as Kata
does): frames pass untouched, so the guest keeps the container's MAC and IP, and
Docker's bridge, DNS names and published ports see the VM where they saw the
container. The container side keeps no address, so it never answers for the guest;
it keeps the routes, which Docker goes on programming as networks come and go
(net.follower follows them into the guest).
"""
import errno
from socket import AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP

from dkvm.container.net.taps import is_guest_nic
from dkvm.log import warn
from dkvm.schema import Address, Interface, Route

ETH_P_ALL = 0x0003
RT_SCOPE_UNIVERSE = 0
RTPROT_KERNEL, RTPROT_STATIC = 2, 4
RTN_UNICAST = 1
MAIN_TABLE = 254
OWN_DNS_RULE_PRIORITY = 10


def ipv6_sysctls():
    """Docker turns IPv6 off in a container's namespace (all, default) and back on for
    the interfaces of IPv6 networks; the guest's kernel must do the same."""
    values = {}
    for scope in ("all", "default", "lo"):
        try:
            with open(f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6") as f:
                values[f"net.ipv6.conf.{scope}.disable_ipv6"] = f.read().strip()
        except OSError:
            pass
    return values


def open_iproute():
    from dkvm.container.net.pyroute2_light import light_pyroute2
    light_pyroute2()
    from pyroute2.iproute.linux import IPRoute
    return IPRoute()


def ready_to_give_back():
    """A namespace that outlives the container gets its interfaces back at exit, in
    the moment between the guest's end and the runtime's SIGKILL (host.kill.KILL_GRACE):
    pyroute2 is loaded beforehand (net/handover leaves the entrypoint without it)."""
    from dkvm.container.net.pyroute2_light import light_pyroute2
    light_pyroute2()
    import importlib
    importlib.import_module("pyroute2.iproute.linux")


def guest_links(ip):
    """The container's interfaces that belong to the guest, by index (those of
    taps.guest_nics)."""
    return sorted((link for link in ip.get_links()
                   if is_guest_nic(link.get_attr("IFLA_IFNAME"), link["ifi_type"],
                                   link.get_attr("IFLA_ADDRESS"))),
                  key=lambda link: link["index"])


def take_over_interfaces(nics, tap_indexes, docker_dns=True):
    """Turn each of the guest's NICs (taps.guest_nics, each with its tap made) into
    plumbing; returns what the guest needs to rebuild them, in the same order.
    `docker_dns`: the namespace is Docker's own, with its embedded DNS server."""
    interfaces = []
    with open_iproute() as ip:
        if docker_dns:
            refuse_own_dns_traffic(ip)
        for nic, tap_index in zip(nics, tap_indexes):
            interfaces.append(describe(ip, ip.get_links(nic.index)[0]))
            hand_over(ip, nic.index, tap_index)
    return interfaces


def give_back_interfaces(interfaces, tap_indexes):
    """Undo take_over_interfaces in a namespace that outlives the container (an
    engine's, under /run/netns): the redirects and taps go, the addresses come back,
    and the next container (or the pod's others) finds the namespace as it was. At
    exit: a failure is warned about, never in place of the exit status."""
    try:
        with open_iproute() as ip:
            for iface, tap_index in zip(interfaces, tap_indexes):
                PLUMBING.part(ip, iface.index)
                ip.link("del", index=tap_index)
                for addr in iface.addresses:
                    spec = {"index": iface.index, "address": addr.address,
                            "prefixlen": addr.prefixlen}
                    if addr.broadcast:
                        spec["broadcast"] = addr.broadcast
                    ip.addr("add", **spec)
    except Exception as err:
        warn(f"could not give the network interfaces back to their namespace: {err!r}")


def refuse_own_dns_traffic(ip):
    """Docker's embedded DNS server forwards external names from this namespace, which
    keeps routes but no address, and whose replies would go to the guest anyway: make
    it fail at once (the guest asks the host's servers itself) instead of waiting.
    Port 53 only: a route lookup without ports, as Docker makes to program a gateway,
    must still work."""
    for family in (AF_INET, AF_INET6):
        for protocol in (IPPROTO_TCP, IPPROTO_UDP):
            ip.rule("add", family=family, priority=OWN_DNS_RULE_PRIORITY,
                    action="FR_ACT_UNREACHABLE", ip_proto=protocol, dport_range="53:53")


def describe(ip, link):
    """The schema.Interface the guest rebuilds this link from."""
    index = link["index"]
    addresses = [Address(family=addr["family"], address=addr.get_attr("IFA_ADDRESS"),
                         prefixlen=addr["prefixlen"],
                         broadcast=addr.get_attr("IFA_BROADCAST") or "")
                 for addr in ip.get_addr(index=index)
                 if addr["family"] in (AF_INET, AF_INET6) and addr["scope"] == RT_SCOPE_UNIVERSE]
    name = link.get_attr("IFLA_IFNAME")
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6") as f:
            ipv6 = f.read().strip() == "0"
    except OSError:
        ipv6 = False
    mac = link.get_attr("IFLA_ADDRESS")
    return Interface(name=name, index=index, mac=mac, mtu=link.get_attr("IFLA_MTU"),
                     ipv6=ipv6, addresses=addresses, routes=docker_routes(ip, index, mac))


def routes_of(ip, index, mac=""):
    """The main table's routes out of one interface (whose MAC is `mac`)."""
    routes = []
    for family in (AF_INET, AF_INET6):
        for route in ip.get_routes(family=family, table=MAIN_TABLE):
            if route.get_attr("RTA_OIF") == index and route["type"] == RTN_UNICAST:
                routes.append(Route(family=family, dst=route.get_attr("RTA_DST") or "",
                                    dst_len=route["dst_len"],
                                    gateway=route.get_attr("RTA_GATEWAY") or "",
                                    metric=route.get_attr("RTA_PRIORITY") or 0,
                                    proto=route["proto"], scope=route["scope"], mac=mac))
    return routes


def docker_routes(ip, index, mac=""):
    """The routes Docker made through an interface, not those its addresses make."""
    return [route for route in routes_of(ip, index, mac) if route.proto != RTPROT_KERNEL]


def hand_over(ip, index, tap_index):
    """The interface gives its addresses to the guest and its frames to the tap.

    Its routes stay (without a source address): Docker keeps programming them as the
    container's networks change, and the guest follows them (net.follower)."""
    routes = routes_of(ip, index)
    for addr in ip.get_addr(index=index):       # link-local ones too: the guest owns them
        ip.addr("del", index=index, address=addr.get_attr("IFA_ADDRESS"),
                prefixlen=addr["prefixlen"])
    left = routes_of(ip, index)
    for route in sorted(routes, key=lambda route: bool(route.gateway)):   # on-link first
        if route not in left:
            add_route(ip, index, route)
    PLUMBING.join(ip, index, tap_index)


def add_route(ip, index, route):
    spec = {"family": route.family, "dst_len": route.dst_len, "oif": index,
            "table": MAIN_TABLE, "proto": route.proto, "scope": route.scope}
    if route.dst_len:
        spec["dst"] = route.dst
    if route.gateway:
        spec["gateway"] = route.gateway
    if route.metric:
        spec["priority"] = route.metric
    try:
        ip.route("add", **spec)
    except Exception as err:        # pyroute2's NetlinkError; EEXIST: it came back itself
        if getattr(err, "code", None) != errno.EEXIST:
            raise


class MirredRedirect:
    """The network mode: how a container interface and its tap become one wire. Here
    tc mirred redirects on both ingresses, so frames pass untouched (the guest keeps the
    container's MAC); a bridge or macvtap would be another class with `join`."""

    def join(self, ip, index, tap_index):
        self.redirect(ip, index, tap_index)
        self.redirect(ip, tap_index, index)

    @staticmethod
    def part(ip, index):
        """The container interface's redirect goes (the tap's goes with the tap)."""
        ip.tc("del", "ingress", index, "ffff:")

    @staticmethod
    def redirect(ip, from_index, to_index):
        """Everything arriving on `from_index` leaves by `to_index`, before any stack
        sees it."""
        ip.tc("add", "ingress", from_index, "ffff:")
        ip.tc("add-filter", "u32", from_index, parent="ffff:", protocol=ETH_P_ALL, target=0x1,
              keys=["0x0/0x0+0"],
              action={"kind": "mirred", "direction": "egress", "action": "redirect",
                      "ifindex": to_index})


PLUMBING = MirredRedirect()
