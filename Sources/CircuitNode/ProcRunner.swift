import CircuitAPI
import CircuitClient
import CircuitStateMachine
import Foundation
import Logging
import ServiceLifecycle
import Synchronization

/// Runs the processes the cluster names under this host (`/X<this host>/...`): the host that owns a process element
/// starts it and reports each phase through the log — running (pid, start time, attempt), then exited (code) or
/// signaled (signal). The work itself never goes through Raft: only the names and the phases do.
///
/// The host runtime's scan and watch of the host's subtree tell it of every process element (`consider`) and of
/// every removal (`scrubbed`): a process whose element is removed is killed. A program that cannot be started is reported exited with code 127, as a shell does.
///
/// Each report names the element's create revision, so a report about an earlier process at the same path is refused
/// (409 `stale_report`), and phases only move forward. An element this runner finds `running` that it did not
/// start is adopted if its process still runs (pid and start time match: the daemon was killed with -9 and
/// restarted), else reported `lost`. Children do not outlive a graceful stop.
final class ProcRunner: Sendable {
    let hostID: String
    let api: String
    let logger: Logger
    /// How long a scrubbed process has between SIGTERM and SIGKILL.
    let scrubGrace: Duration

    /// A child of this runner, by element path.
    private struct Running {
        var pid: pid_t
        var createRevision: UInt64
        var startedAt: UInt64
    }
    private let running = Mutex<[String: Running]>([:])
    /// Elements started (or found ended) by this runner, as `path@createRevision`: each is started once.
    private let started = Mutex<Set<String>>([])
    /// Held while a process is started and its start queued for report, and while a child's end is recorded.
    private let launching = Mutex<Void>(())
    /// This daemon is stopping and has killed its children: their ends are theirs no more, but their host's.
    private let stopping = Atomic(false)
    /// The standard streams of the processes this runner started, until their elements are removed; and the
    /// requests waiting for a pending process's streams.
    private struct Streams {
        var ios: [String: (createRevision: UInt64, io: ProcIO)] = [:]
        var waiters: [String: [(id: UInt64, continuation: CheckedContinuation<Void, Never>)]] = [:]
    }
    private let streams = Mutex(Streams())
    private let reports: AsyncStream<(String, ProcStateView)>
    private let reportSink: AsyncStream<(String, ProcStateView)>.Continuation

    init(hostID: String, api: String, scrubGrace: Duration, logger: Logger) {
        self.scrubGrace = scrubGrace
        self.hostID = hostID
        self.api = api
        self.logger = logger
        (reports, reportSink) = AsyncStream.makeStream()
    }

    private var client: CircuitClient { CircuitClient(endpoints: [api]) }

    /// Starts delivering reports, one at a time; `stop` ends it.
    func startReporting() -> Task<Void, Never> {
        Task { for await (path, state) in reports { await deliver(path, state) } }
    }

    /// The children are killed and their ends reported (for up to 3 s) as `lost`: the host took them down, they did
    /// not end on their own. So a job's attempt is placed again on another host, as for a host that died, instead of
    /// ending the job as signaled (a rolling restart must not end every job it passes).
    func stop(reporter: Task<Void, Never>) async {
        stopping.store(true, ordering: .sequentiallyConsistent)
        let ios = streams.withLock { s -> [ProcIO] in
            defer { s.ios = [:] }
            return s.ios.values.map(\.io)
        }
        for io in ios { io.close() }
        running.withLock { running in
            for (_, r) in running { kill(-r.pid, SIGKILL) }
        }
        let deadline = ContinuousClock.now + .seconds(3)
        while running.withLock({ !$0.isEmpty }) && ContinuousClock.now < deadline { try? await Task.sleep(for: .milliseconds(10)) }
        reportSink.finish()
        let drained = Task {
            try? await Task.sleep(for: .seconds(3))
            reporter.cancel()
        }
        await reporter.value
        drained.cancel()
    }

    /// After a scan of the host's subtree (`present`: each process's path and create revision): children whose
    /// element went while no watch was open were scrubbed.
    func keep(only present: [String: UInt64]) {
        let orphans = running.withLock { running in running.filter { present[$0.key] != $0.value.createRevision }.map(\.key) }
        for path in orphans { scrubbed(path) }
    }

    /// Starts the process at `path` if it is pending and was not started before; reports it lost if it is running
    /// but not a child of this runner.
    func consider(_ path: String, _ view: ElementView) {
        guard let command = view.command, let created = view.createRevision else { return }
        let key = "\(path)@\(created)"
        switch view.phase {
        case "pending":
            guard started.withLock({ $0.insert(key).inserted }) else { return }
            // A child of an older element at this path still runs: a path holds one element at a time, so that one
            // was removed, though its removal has not reached this host's watch yet (each event is looked up as the
            // state is now, so a lagging watch can meet the new element before the old one's removal).
            scrubbed(path, deletedAt: created)
            launch(path, command, createRevision: created, attempts: view.attempts ?? 0)
        case "running":
            guard started.withLock({ $0.insert(key).inserted }) else { return }  // ours, or already reported
            let pid = pid_t(view.pid ?? 0)
            if pid > 0, let startedAt = view.startedAt, ProcessIdentity.isSame(pid, startedAt: startedAt) {
                adopt(path, pid: pid, createRevision: created, startedAt: startedAt, attempts: view.attempts ?? 0)
                return
            }
            logger.warning("a process recorded running here is gone: reporting it lost", metadata: ["path": "\(path)"])
            report(path, ProcStateView(phase: "lost", pid: view.pid ?? 0, endedAt: Self.nowMillis(), attempts: view.attempts ?? 0, createRevision: created))
        case "lost":
            // The cluster gave this host up for dead meanwhile (its session expired) and may have run the work
            // elsewhere: a child of ours still running for that element is stopped.
            if running.withLock({ $0[path]?.createRevision == created }) {
                logger.warning("a process of this host was declared lost while it ran (this host's session expired): stopping it", metadata: ["path": "\(path)"])
                scrubbed(path)
            } else if started.withLock({ $0.insert(key).inserted }), let pid = view.pid.map(pid_t.init), pid > 0,
                let startedAt = view.startedAt, ProcessIdentity.isSame(pid, startedAt: startedAt)
            {
                // The same, found by a daemon that restarted: a child of its earlier run, still running (its process
                // group outlived the daemon), whose element was declared lost while the daemon was down. Adopted to
                // be stopped as a scrub stops it.
                logger.warning("a process started before this daemon restarted was declared lost meanwhile: stopping it", metadata: ["path": "\(path)", "pid": "\(pid)"])
                adopt(path, pid: pid, createRevision: created, startedAt: startedAt, attempts: view.attempts ?? 0)
                scrubbed(path)
            }
        default:
            return
        }
    }

    /// A launch's end for the readers waiting for the streams of `path`: its streams (`new`, put in place under one
    /// lock with the wake-up; the streams of an older element there are closed) or none (nil: the program could not
    /// start).
    private func settleStreams(_ path: String, _ new: (createRevision: UInt64, io: ProcIO)?) {
        let (old, waiters) = streams.withLock { s in
            defer { s.waiters[path] = nil }
            let old = new.flatMap { s.ios.updateValue($0, forKey: path) }
            return (old, s.waiters[path] ?? [])
        }
        old?.io.close()
        for w in waiters { w.continuation.resume() }
    }

    private func launch(_ path: String, _ command: ProcCommandView, createRevision: UInt64, attempts: UInt32) {
        let attempt = attempts + 1
        let pid: pid_t? = launching.withLock { _ in
            let startedAt = Self.nowMillis()
            let pid: pid_t
            let io: ProcIO
            do {
                (pid, io) = try Self.spawnWithPipes(command)
            } catch {
                logger.warning("could not start a process", metadata: ["path": "\(path)", "program": "\(command.path)", "error": "\(error)"])
                // Readers waiting for its streams hear at once that there are none (`not_running`).
                settleStreams(path, nil)
                report(path, ProcStateView(phase: "exited", exitCode: 127, startedAt: startedAt, endedAt: startedAt, attempts: attempt, createRevision: createRevision))
                return nil
            }
            running.withLock { $0[path] = Running(pid: pid, createRevision: createRevision, startedAt: startedAt) }
            settleStreams(path, (createRevision, io))
            report(path, ProcStateView(phase: "running", pid: Int64(pid), startedAt: startedAt, attempts: attempt, createRevision: createRevision))
            return pid
        }
        guard let pid else { return }
        logger.info("started a process", metadata: ["path": "\(path)", "pid": "\(pid)"])
        // One waiting thread per child: it sees the end without reaping (so the pid cannot be reused while a signal
        // may still be sent to it), records and reports the end, then reaps.
        let waiter = Thread { [self] in
            var info = siginfo_t()
            var seen: Int32
            repeat { seen = waitid(P_PID, id_t(pid), &info, WEXITED | WNOWAIT) } while seen == -1 && errno == EINTR
            var status: Int32 = 0
            var reaped: pid_t = 0
            let now = Self.nowMillis()
            var state = ProcStateView(phase: "lost")
            launching.withLock { _ in
                let startedAt = running.withLock { running -> UInt64 in
                    guard let r = running[path], r.pid == pid else { return 0 }
                    running[path] = nil
                    return r.startedAt
                }
                repeat { reaped = waitpid(pid, &status, 0) } while reaped == -1 && errno == EINTR
                let signal = status & 0x7f
                if reaped != pid || (signal == SIGKILL && stopping.load(ordering: .sequentiallyConsistent)) {
                    state = ProcStateView(phase: "lost", pid: Int64(pid), endedAt: now, attempts: attempt, createRevision: createRevision)
                } else if signal != 0 && signal != 0x7f {
                    state = ProcStateView(phase: "signaled", pid: Int64(pid), signal: signal, endedAt: now, attempts: attempt, createRevision: createRevision)
                } else {
                    state = ProcStateView(phase: "exited", pid: Int64(pid), exitCode: (status >> 8) & 0xff, endedAt: now, attempts: attempt, createRevision: createRevision)
                }
                state.startedAt = startedAt
                report(path, state)
            }
        }
        waiter.start()
    }

    /// Starts `command` with its stdin, stdout and stderr on pipes whose other ends this host holds.
    static func spawnWithPipes(_ command: ProcCommandView) throws -> (pid_t, ProcIO) {
        var fds: [CInt] = []
        defer { for fd in fds { close(fd) } }  // on failure all, on success the child's ends
        for _ in 0..<3 {
            var pair: [CInt] = [-1, -1]
            // Not inherited by other children: close-on-exec (and each child closes every descriptor from 3 on).
            guard pipe(&pair) == 0 else { throw SpawnError(program: command.path, errno: errno) }
            fds += pair
            for fd in pair { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        }
        // fds: stdin (read, write), stdout (read, write), stderr (read, write)
        let pid = try spawn(command, stdio: (fds[0], fds[3], fds[5]))
        let io = ProcIO(stdin: fds[1], stdout: fds[2], stderr: fds[4])
        fds = [fds[0], fds[3], fds[5]]
        return (pid, io)
    }

    // MARK: - Adopting the children of an earlier run

    /// glibc's pidfd_open (2.36 and later): a descriptor that becomes readable when the process ends.
    private static let pidfdOpen: (@convention(c) (pid_t, UInt32) -> Int32)? = {
        guard let symbol = dlsym(dlopen(nil, RTLD_NOW), "pidfd_open") else { return nil }
        return unsafeBitCast(symbol, to: (@convention(c) (pid_t, UInt32) -> Int32).self)
    }()

    /// Takes back a process an earlier run of this daemon started (it outlived a kill -9 of the daemon): it stays
    /// `running`, takes signals and scrubs, and when it ends it is reported `lost` with its end time — it is no longer
    /// this daemon's child, so its exit status cannot be known. Its stdio pipes ended with the earlier run.
    private func adopt(_ path: String, pid: pid_t, createRevision: UInt64, startedAt: UInt64, attempts: UInt32) {
        running.withLock { $0[path] = Running(pid: pid, createRevision: createRevision, startedAt: startedAt) }
        logger.notice("adopted a process started before this daemon restarted", metadata: ["path": "\(path)", "pid": "\(pid)"])
        let watcher = Thread { [self] in
            if let open = Self.pidfdOpen, case let fd = open(pid, 0), fd >= 0 {
                var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                while poll(&poller, 1, -1) == -1 && errno == EINTR {}
                Glibc.close(fd)
            } else {
                while ProcessIdentity.isSame(pid, startedAt: startedAt) { usleep(100_000) }
            }
            launching.withLock { _ in
                let ours = running.withLock { running -> Bool in
                    guard running[path]?.pid == pid else { return false }
                    running[path] = nil
                    return true
                }
                guard ours else { return }
                report(path, ProcStateView(
                    phase: "lost", pid: Int64(pid), startedAt: startedAt, endedAt: Self.nowMillis(), attempts: attempts,
                    createRevision: createRevision))
            }
        }
        watcher.start()
    }

    /// glibc's posix_spawn_file_actions_addchdir_np (2.29 and later), which the Glibc module does not export.
    private static let addChdir: (@convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, UnsafePointer<CChar>) -> Int32)? = {
        guard let symbol = dlsym(dlopen(nil, RTLD_NOW), "posix_spawn_file_actions_addchdir_np") else { return nil }
        return unsafeBitCast(
            symbol, to: (@convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, UnsafePointer<CChar>) -> Int32).self)
    }()

    /// glibc's posix_spawn_file_actions_addclosefrom_np (2.34 and later).
    private static let addCloseFrom: (@convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32)? = {
        guard let symbol = dlsym(dlopen(nil, RTLD_NOW), "posix_spawn_file_actions_addclosefrom_np") else { return nil }
        return unsafeBitCast(symbol, to: (@convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32).self)
    }()

    /// Starts `command` with posix_spawn, never through a shell: signals at their defaults and none blocked (the
    /// daemon ignores SIGTERM and SIGINT to shut down gracefully, and a child would inherit that), in a process group
    /// of its own (so a scrub can kill its children too), stdio on /dev/null, in `dir` if given, with `env` if given
    /// (else the daemon's environment).
    static func spawn(_ command: ProcCommandView, stdio: (CInt, CInt, CInt)? = nil) throws -> pid_t {
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var all = sigset_t()
        sigfillset(&all)
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setpgroup(&attributes, 0)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETPGROUP))
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        if let (input, output, error) = stdio {
            posix_spawn_file_actions_adddup2(&actions, input, 0)
            posix_spawn_file_actions_adddup2(&actions, output, 1)
            posix_spawn_file_actions_adddup2(&actions, error, 2)
        } else {
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
            posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
            posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
        }
        // Nothing of the daemon's (its sockets, its log, its folder's files) leaks into the child.
        if let closeFrom = Self.addCloseFrom { _ = closeFrom(&actions, 3) }
        if let dir = command.dir, !dir.isEmpty {
            guard let addChdir = Self.addChdir else { throw SpawnError(program: command.path, errno: ENOSYS) }
            guard addChdir(&actions, dir) == 0 else { throw SpawnError(program: command.path, errno: EINVAL) }
        }
        let argv: [UnsafeMutablePointer<CChar>?] = ([command.path] + (command.args ?? [])).map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        let envStrings = command.env.flatMap { $0.isEmpty ? nil : $0 }
        let envp: [UnsafeMutablePointer<CChar>?]? = envStrings.map { $0.map { strdup($0) } + [nil] }
        defer { for e in envp ?? [] { free(e) } }
        var pid = pid_t()
        let rc: Int32 =
            if let envp {
                posix_spawn(&pid, command.path, &actions, &attributes, argv, envp)
            } else {
                posix_spawn(&pid, command.path, &actions, &attributes, argv, environ)
            }
        guard rc == 0 else { throw SpawnError(program: command.path, errno: rc) }
        return pid
    }

    /// Reports go out one at a time, in the order they were made: an exit never overtakes its start.
    private func report(_ path: String, _ state: ProcStateView) {
        reportSink.yield((path, state))
    }

    /// Delivers one report, retried until the cluster takes or refuses it (a leader may be changing).
    private func deliver(_ path: String, _ state: ProcStateView) async {
        var attempts = 0
        while !Task.isCancelled {
            do {
                _ = try await client.reportProc(path, state)
                return
            } catch {
                if case .api(let e) = error, ["not_found", "wrong_kind", "stale_report", "host_not_alive"].contains(e.code) { return }
                attempts += 1
                if attempts % 50 == 1 {
                    logger.info("retrying a process's report", metadata: ["path": "\(path)", "phase": "\(state.phase)", "error": "\(error)"])
                }
                try? await Task.sleep(for: .milliseconds(100))
            }
        }
        logger.error("could not report a process's state before stopping", metadata: ["path": "\(path)", "phase": "\(state.phase)"])
    }

    /// The streams of this host's process at `path` (created at `createRevision`); if it has not started yet, waits
    /// up to `timeout` for it to start. Nil if this host runs no such process.
    func io(_ path: String, createRevision: UInt64?, timeout: Duration) async -> ProcIO? {
        func current(_ s: Streams) -> ProcIO? {
            guard let e = s.ios[path], createRevision == nil || e.createRevision == createRevision else { return nil }
            return e.io
        }
        if let io = streams.withLock({ current($0) }) { return io }
        guard timeout > .zero else { return nil }
        let id = UInt64.random(in: 1...UInt64.max)
        let timer = Task {
            try? await Task.sleep(for: timeout)
            let waiter = streams.withLock { s -> CheckedContinuation<Void, Never>? in
                guard let i = s.waiters[path]?.firstIndex(where: { $0.id == id }) else { return nil }
                return s.waiters[path]!.remove(at: i).continuation
            }
            waiter?.resume()
        }
        // Looked at and registered under one lock: a launch cannot fall between them.
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let ready = streams.withLock { s -> Bool in
                if current(s) != nil { return true }
                s.waiters[path, default: []].append((id, c))
                return false
            }
            if ready { c.resume() }
        }
        timer.cancel()
        return streams.withLock { current($0) }
    }

    /// The element was removed: its process (and its group) is killed.
    ///
    /// SIGTERM goes to its process group first; whatever of the group is left after `scrubGrace` gets SIGKILL. (A
    /// process group's id cannot be handed to a new process while the group has members, so the SIGKILL reaches
    /// only what is left of this one.)
    ///
    /// `deletedAt`: the revision that removed the element (or that made the path's next one). A child at the same path
    /// created at or after it belongs to a new element and is left alone: a lagging watch may have started the path's
    /// next process before it sees the removal of the one before.
    func scrubbed(_ path: String, deletedAt revision: UInt64? = nil) {
        func removed(_ createRevision: UInt64) -> Bool { revision.map { createRevision < $0 } ?? true }
        let io = streams.withLock { s -> ProcIO? in
            guard let e = s.ios[path], removed(e.createRevision) else { return nil }
            return s.ios.removeValue(forKey: path)?.io
        }
        io?.close()
        let pid: pid_t? = running.withLock { running in
            guard let r = running[path], removed(r.createRevision) else { return nil }
            kill(-r.pid, SIGTERM)
            return r.pid
        }
        guard let pid else { return }
        logger.info("stopping a scrubbed process", metadata: ["path": "\(path)", "pid": "\(pid)"])
        let grace = scrubGrace / .seconds(1)
        // On a timer of Dispatch's, not a task's sleep: the kill is not held up by a busy cooperative pool.
        DispatchQueue.global().asyncAfter(deadline: .now() + grace) { [self] in
            // The group's id is its leader's pid. While the leader is this path's child not yet reaped, or while no
            // process has that pid (what is left of the group holds the id: the kernel gives it to no new process
            // meanwhile), the id names this group. Otherwise the group is gone and its id may be another process's,
            // which must not be killed.
            running.withLock { running in
                if running[path]?.pid == pid || kill(pid, 0) != 0 { kill(-pid, SIGKILL) }
            }
        }
    }

    /// Sends `signal` to this host's process at `path` (created at `createRevision`, if given); false if this host
    /// runs none there. Under the lock the waiter takes before reaping: the pid is still this child's.
    func signal(_ path: String, _ signal: Int32, createRevision: UInt64? = nil) -> Bool {
        running.withLock { running in
            guard let r = running[path], createRevision == nil || createRevision == r.createRevision else { return false }
            return kill(r.pid, signal) == 0
        }
    }

    static func nowMillis() -> UInt64 { UInt64(Date().timeIntervalSince1970 * 1000) }

    /// A signal by name (TERM, SIGTERM) or number.
    static func signalNumber(_ s: String) -> Int32? {
        if let n = Int32(s), n > 0, n < 65 { return n }
        var name = s.uppercased()
        if name.hasPrefix("SIG") { name.removeFirst(3) }
        let names: [String: Int32] = [
            "HUP": SIGHUP, "INT": SIGINT, "QUIT": SIGQUIT, "KILL": SIGKILL, "USR1": SIGUSR1, "USR2": SIGUSR2,
            "TERM": SIGTERM, "CONT": SIGCONT, "STOP": SIGSTOP, "ALRM": SIGALRM,
        ]
        return names[name]
    }
}


struct SpawnError: Error, CustomStringConvertible {
    var program: String
    var errno: Int32
    var description: String { "cannot start \(program): \(String(cString: strerror(errno)))" }
}


/// Starts `path` with `arguments` as the runner starts a process element (signals at their defaults and none
/// blocked, a process group of its own), with its stdio on the given descriptors; answers its pid. For tools and
/// tests that must start a child whose signals work whatever the caller blocks.
public func spawnClean(_ path: String, _ arguments: [String], stdio: (CInt, CInt, CInt)) throws -> pid_t {
    try ProcRunner.spawn(ProcCommandView(path: path, args: arguments), stdio: stdio)
}
