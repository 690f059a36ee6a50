/* The pod's sandbox process for the CRI tests' private containerd (a registry's
 * pause image cannot be pulled here): it holds the pod's namespaces, reaps the
 * orphans a shared PID namespace gives it, and exits at once on SIGTERM or SIGINT,
 * as the kubelet's pause does. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void leave(int sig) { (void)sig; _exit(0); }

static void reap(int sig)
{
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0)
        ;
}

int main(void)
{
    struct sigaction quit = {.sa_handler = leave}, child = {.sa_handler = reap};
    sigaction(SIGTERM, &quit, NULL);
    sigaction(SIGINT, &quit, NULL);
    child.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    sigaction(SIGCHLD, &child, NULL);
    for (;;)
        pause();
    return 1;
}
