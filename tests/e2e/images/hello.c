/* The only file of the "static" test image: no shell, no libc in the image. */
#include <stdio.h>
#include <sys/utsname.h>

int main(int argc, char **argv) {
    struct utsname u;
    if (uname(&u) != 0)
        return 1;
    printf("%s\n", u.release);
    for (int i = 1; i < argc; i++)
        printf("arg:%s\n", argv[i]);
    return argc > 1 ? 7 : 0;
}
