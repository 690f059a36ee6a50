"""The container side of networking: each of the container's interfaces hands its
identity (MAC, addresses, MTU, routes) to the VM and becomes plumbing.

A tap per interface, joined to it by tc mirred redirects on both ingresses (as Kata
does): frames pass untouched, so the guest keeps the container's MAC and IP, and
Docker's bridge, DNS names and published ports see the VM where they saw the
container. The container side keeps no address, so it never answers for the guest.
"""
from socket import AF_INET, AF_INET6

ETH_P_ALL = 0x0003
RT_SCOPE_UNIVERSE = 0
RTPROT_KERNEL = 2
MAIN_TABLE = 254


def tap_name(index):
    return f"dkvm-tap{index}"


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


def take_over_interfaces():
    """Turn every non-loopback interface into plumbing; returns what the guest needs
    to rebuild them, in the order their taps are numbered."""
    from dkvm.pyroute2_light import light_pyroute2
    light_pyroute2()
    from pyroute2.iproute.linux import IPRoute
    interfaces = []
    with IPRoute() as ip:
        links = sorted((link for link in ip.get_links()
                        if link.get_attr("IFLA_IFNAME") != "lo" and link.get_attr("IFLA_ADDRESS")),
                       key=lambda link: link["index"])
        for number, link in enumerate(links):
            interfaces.append(describe(ip, link))
            plumb(ip, link["index"], tap_name(number), link.get_attr("IFLA_MTU"))
    return interfaces


def describe(ip, link):
    index = link["index"]
    addresses = []
    for addr in ip.get_addr(index=index):
        if addr["family"] in (AF_INET, AF_INET6) and addr["scope"] == RT_SCOPE_UNIVERSE:
            addresses.append([addr["family"], addr.get_attr("IFA_ADDRESS"), addr["prefixlen"],
                              addr.get_attr("IFA_BROADCAST") or ""])
    routes = []
    for family in (AF_INET, AF_INET6):
        for route in ip.get_routes(family=family, table=MAIN_TABLE):
            if route.get_attr("RTA_OIF") != index or route["proto"] == RTPROT_KERNEL:
                continue
            routes.append({"family": family, "dst": route.get_attr("RTA_DST") or "",
                           "dst_len": route["dst_len"], "gateway": route.get_attr("RTA_GATEWAY") or "",
                           "metric": route.get_attr("RTA_PRIORITY") or 0})
    name = link.get_attr("IFLA_IFNAME")
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6") as f:
            ipv6 = f.read().strip() == "0"
    except OSError:
        ipv6 = False
    return {"name": name, "mac": link.get_attr("IFLA_ADDRESS"), "mtu": link.get_attr("IFLA_MTU"),
            "ipv6": ipv6, "addresses": addresses, "routes": routes}


def plumb(ip, index, tap, mtu):
    ip.link("add", ifname=tap, kind="tuntap", mode="tap")
    tap_index = ip.link_lookup(ifname=tap)[0]
    ip.link("set", index=tap_index, mtu=mtu, state="up")
    for addr in ip.get_addr(index=index):       # link-local ones too: the guest owns them
        ip.addr("del", index=index, address=addr.get_attr("IFA_ADDRESS"),
                prefixlen=addr["prefixlen"])
    redirect(ip, index, tap_index)
    redirect(ip, tap_index, index)


def redirect(ip, from_index, to_index):
    """Everything arriving on `from_index` leaves by `to_index`, before any stack sees it."""
    ip.tc("add", "ingress", from_index, "ffff:")
    ip.tc("add-filter", "u32", from_index, parent="ffff:", protocol=ETH_P_ALL, target=0x1,
          keys=["0x0/0x0+0"],
          action={"kind": "mirred", "direction": "egress", "action": "redirect",
                  "ifindex": to_index})
