/* A hostile image's preloaded library: wherever a loader maps it, it says so on the
 * container's stderr (PID 1's, which `docker logs` shows: on the container side that
 * is DKVM's entrypoint, in the guest the workload) with the kernel it runs under. */
#include <fcntl.h>
#include <stdio.h>
#include <sys/utsname.h>
#include <unistd.h>

__attribute__((constructor)) static void announce(void)
{
    struct utsname u;
    char comm[64] = "?";
    int fd = open("/proc/self/comm", O_RDONLY);
    if (fd >= 0) {
        ssize_t n = read(fd, comm, sizeof comm - 1);
        comm[n > 0 ? n - 1 : 0] = 0;
        close(fd);
    }
    uname(&u);
    fd = open("/proc/1/fd/2", O_WRONLY);
    dprintf(fd >= 0 ? fd : 2, "EVIL kernel=%s comm=%s\n", u.release, comm);
    if (fd >= 0)
        close(fd);
}
