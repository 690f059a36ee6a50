"""The container side's networking: the container's interfaces handed to the VM as
taps (taps, plumbing), the guest's netlink requests encoded here (steps, with the
light pyroute2 loader), `docker network connect`/`disconnect` followed (follower),
and Docker's embedded DNS asked for the guest (dns_relay)."""
