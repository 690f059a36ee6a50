"""What the host and the container side (and build.py) share to boot a kernel that is
not the payload's own, and no guest code uses: the image's tree read as data, inside
that tree and bounded (rooted), the image's kernel (image_kernel) and the newc
initramfs with its module load order (initramfs); and what makes and restores a VM
template (host.templates, container.restore): the template's machine (machine) and
the QMP client (qmp)."""
