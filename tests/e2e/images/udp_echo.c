/* A UDP echo server on port 9000 (busybox has none): "pong:" + what it got. */
#include <arpa/inet.h>
#include <string.h>
#include <sys/socket.h>

int main(void)
{
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(9000)};
    char buf[128] = "pong:";
    if (s < 0 || bind(s, (struct sockaddr *)&addr, sizeof addr) != 0)
        return 1;
    for (;;) {
        struct sockaddr_in peer;
        socklen_t len = sizeof peer;
        ssize_t n = recvfrom(s, buf + 5, sizeof buf - 5, 0, (struct sockaddr *)&peer, &len);
        if (n >= 0)
            sendto(s, buf, n + 5, 0, (struct sockaddr *)&peer, len);
    }
}
