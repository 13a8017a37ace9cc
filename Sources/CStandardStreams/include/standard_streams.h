// Standard input, output and error held open from the process's first instruction on.
#ifndef CIRCUIT_STANDARD_STREAMS_H
#define CIRCUIT_STANDARD_STREAMS_H

/// Which of descriptors 0, 1 and 2 were closed when the process started (bit 0: standard input, and so on). Each
/// such descriptor was opened onto /dev/null before anything else ran, so that no file, socket or event queue the
/// process opens later (libdispatch's epoll, NIO's sockets) takes its number and is read as standard input or written
/// as standard output.
int circuit_standard_streams_closed_at_start(void);

#endif
