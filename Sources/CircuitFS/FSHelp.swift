/// The text of every `help` file.
enum FSHelp {
    static let root = """
        The circuit, mounted as a file system.

        X<16 hex digits>/   one directory per live host: its elements (dc/) and facts (sys/)
        records/            the cluster's records: a file per record (read: its value; write: sets it; rm: deletes
                            it), a directory per path segment that has records below it (mkdir makes one on this
                            mount until a record is written in it)
        help                this text

        Everything here goes through the cluster's API: names through Raft, data point-to-point with the host that
        owns the element. A failed operation sets errno (EEXIST, ENOENT, EINVAL, EAGAIN, EBUSY, EPIPE, EHOSTDOWN,
        EIO) and, under an element, its `error` file says what went wrong.

        A write is handed over as soon as it is whole (a command or clauses that parse as JSON, a capacity or a signal
        ending in a newline, any write to trysend, close or abort), so its failure is write's errno; a message to
        `send` is whole only at close, and close's errno, which the shell's echo ignores, is the failure: check
        `error`, or write with a program that reports it (cat, /bin/echo, dd).

        """

    static func host(_ id: String) -> String {
        """
        The host \(id).

        dc/     its elements: proc/, chan/ and select/ (see dc/help)
        sys/    read-only facts: cpus, memory (total and available, bytes), load (1, 5, 15 minutes), raft (role, term,
                leader) and status (all of it as JSON)
        help    this text

        """
    }

    static let dc = """
        The elements of this host, one directory per kind. `mkdir KIND/NAME` takes the name /X<host>/NAME through
        Raft at once (a reservation every mount sees); giving the element what it needs makes it there.

        proc/NAME     a process: write its command to `run`
        chan/NAME     a channel: write its capacity to `cap`
        select/NAME   a select: write its clauses to `select`

        Names share one namespace per host: a proc and a chan cannot both be called NAME. `rmdir` removes the element.

        """

    static let proc = """
        A process on this host (the element /X<host>/NAME).

        run       write the command as JSON, then close: {"path": "/bin/ls", "args": ["-a", "/"], "env": ["K=V"],
                  "dir": "/tmp"}; the host starts it. Read: the command.
        waitexit  a read blocks until the process ends, then gives its final state as JSON (phase exited, signaled or
                  lost; exit_code; signal)
        stdin     what is written goes to the process's standard input; closing the file after a write closes it
        stdout    its standard output, read as it comes (one reader at a time); ends when the process closes it
        stderr    its standard error, likewise
        signal    write a signal's name (TERM, KILL, INT, HUP, ...) or number, and a newline, to send it to the process
        stat      its state as JSON: phase (pending, running, exited, signaled, lost), pid, exit_code, started_at, ...
        env       its environment additions, one per line
        error     what the last failed operation here did wrong, in words
        help      this text

        rmdir of a process that has ended removes it. A running one is refused with EBUSY: signal it first
        (echo KILL > signal), or remove it through the CLI (`circuit scrub`), which stops it.

        """

    static let chan = """
        A channel whose buffer lives on this host (the element /X<host>/NAME). Go's semantics: FIFO; capacity 0 is a
        rendezvous; a closed channel delivers what it holds, then refuses.

        cap       write the capacity once (0: every send waits for its receiver); this creates the channel. Read: it.
        send      the bytes written until close are one message; close returns once it is buffered or received
        recv      a read blocks until a message comes, then gives it whole (EPIPE once closed and empty)
        trysend   as send, but fails at once with EAGAIN instead of waiting; each write is one message
        tryrecv   as recv, but fails at once with EAGAIN when there is no message
        close     write anything to close the channel
        stat      capacity, buffered messages, sends, receives, waiting senders and receivers, closed (JSON)
        error     what the last failed operation here did wrong, in words
        help      this text

        rmdir removes the channel; operations waiting on it fail.

        """

    static let select = """
        A select on this host (the element /X<host>/NAME): waits for the first of its clauses that can fire.

        select    write the clauses as a JSON array, then close; this creates it. Each clause is
                  {"op": "recv", "chan": "/X<host>/NAME"}, {"op": "send", "chan": "...", "message": "text"},
                  {"op": "wait", "proc": "/X<host>/NAME"} or {"op": "default"}. Read: the clauses.
        wait      a read blocks until one clause fires, then gives {"clause": i, "op": ..., "message": ...} (JSON);
                  each time the file is opened and read, the select runs once more
        message   the message received by the recv clause that fired at the last wait read here, as raw bytes (if
                  none was read yet, reading it runs the select as wait does)
        abort     write anything to abort the select (it is removed)
        error     what the last failed operation here did wrong, in words
        help      this text

        """
}
