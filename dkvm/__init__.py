"""DKVM: run ordinary container images as QEMU virtual machines, as a Docker runtime."""
__version__ = "0.1.0"
