"""Runs in the VM, as its init: rebuilds the container's world and runs the workload
and `docker exec`s. Imports only what it must (each module costs boot time under TCG),
and never the container side's or the host's code."""
