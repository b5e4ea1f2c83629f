/*
 * LD_PRELOAD shim for the dev cluster: a bind() to the wildcard address (0.0.0.0 or ::) becomes a
 * bind() to loopback (127.0.0.1 or ::1). slurmctld and slurmdbd always listen on every interface
 * (CommunicationParameters=NoInAddrAny does not apply to them); the test cluster must not.
 * Built by launch/dev_cluster.sh into its state folder.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    static bind_fn real_bind;

    if (!real_bind) {
        real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
        if (!real_bind) {
            errno = ENOSYS;
            return -1;
        }
    }
    if (addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in in4;

        memcpy(&in4, addr, sizeof(in4));
        if (in4.sin_addr.s_addr == htonl(INADDR_ANY)) {
            in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real_bind(fd, (const struct sockaddr *)&in4, sizeof(in4));
        }
    } else if (addr && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in6;

        memcpy(&in6, addr, sizeof(in6));
        if (IN6_IS_ADDR_UNSPECIFIED(&in6.sin6_addr)) {
            in6.sin6_addr = in6addr_loopback;
            return real_bind(fd, (const struct sockaddr *)&in6, sizeof(in6));
        }
    }
    return real_bind(fd, addr, len);
}
