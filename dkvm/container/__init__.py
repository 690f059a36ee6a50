"""Runs in the container, on the host's kernel: the VM's host side (supervisor, QEMU and
virtiofsd command lines, QMP, network plumbing, the DNS relay) and the `docker exec`
relay. Everything it receives from the guest is untrusted. Never imports the guest's
code or the host's."""
