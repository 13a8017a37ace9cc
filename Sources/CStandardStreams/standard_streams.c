#include "standard_streams.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

static int closed_at_start = 0;

// Runs before main and before the Swift runtime opens anything (an ELF constructor of the executable).
__attribute__((constructor)) static void circuit_hold_standard_streams(void) {
    for (int fd = 0; fd <= 2; fd++) {
        if (fcntl(fd, F_GETFD) == -1 && errno == EBADF) {
            // The lowest free number is this one: /dev/null takes it.
            int opened = open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
            if (opened == fd) {
                closed_at_start |= 1 << fd;
            } else if (opened >= 0) {
                close(opened);
            }
        }
    }
}

int circuit_standard_streams_closed_at_start(void) { return closed_at_start; }
