import Foundation
import NIOCore
import Synchronization

/// Keeps one of a process's stdio pipes large while a client streams through it, and at its own size otherwise.
///
/// A pipe of 1 MiB lets the child and this host trade a MiB a turn instead of Linux's default 64 KiB. But Linux counts
/// every pipe's size against its user's quota (`/proc/sys/fs/pipe-user-pages-soft`, 64 MiB by default): past it,
/// each new pipe an unprivileged user makes gets two pages, its children's included. So only pipes being streamed
/// are enlarged, they go back once the stream ends (retried each second while the pipe holds more than its own size,
/// which the kernel refuses), and an unprivileged daemon enlarges at most half the quota's worth at once (`PipeBudget`),
/// each no larger than `/proc/sys/fs/pipe-max-size`. Root, which the quota does not limit, enlarges any.
///
/// Every resize runs on the pipe channel's event loop, where NIO closes the descriptor: while the channel is active,
/// the number is still this pipe's. A resize the kernel refuses changes only the speed.
final class PipeSizer: Sendable {
    /// The size of a streamed pipe.
    static let large: Int = geteuid() == 0 ? 1 << 20 : min(1 << 20, procValue("/proc/sys/fs/pipe-max-size") ?? 64 << 10)

    private struct State {
        /// A client streams through the pipe.
        var wanted = false
        /// The pipe's own size, while it is enlarged.
        var original: Int?
        /// A shrink the kernel refused is to be tried again.
        var retrying = false
    }
    private let state = Mutex(State())
    private let fd: CInt
    private let channel: EventLoopFuture<any Channel>
    private let budget: PipeBudget
    private let retryEvery: TimeAmount

    init(fd: CInt, channel: EventLoopFuture<any Channel>, budget: PipeBudget = .shared, retryEvery: TimeAmount = .seconds(1)) {
        self.fd = fd
        self.channel = channel
        self.budget = budget
        self.retryEvery = retryEvery
        channel.whenSuccess { [self] channel in channel.closeFuture.whenComplete { _ in self.closed() } }
    }

    /// A client starts (true) or stops (false) streaming through the pipe. The pipe follows on its event loop (where
    /// a future's callbacks run), with the latest of these however they were queued.
    func streaming(_ wanted: Bool) {
        state.withLock { $0.wanted = wanted }
        channel.whenSuccess { [self] channel in apply(channel) }
    }

    private func apply(_ channel: any Channel) {
        guard channel.isActive else { return }
        let now = state.withLock { $0 }
        if now.wanted, now.original == nil {
            guard budget.take() else { return }
            let original = Int(fcntl(fd, PipeSize.get))
            if original > 0, original < Self.large, fcntl(fd, PipeSize.set, CInt(Self.large)) >= 0 {
                state.withLock { $0.original = original }
            } else {
                budget.giveBack()
            }
        } else if !now.wanted, let original = now.original {
            if fcntl(fd, PipeSize.set, CInt(original)) >= 0 {
                state.withLock { $0.original = nil }
                budget.giveBack()
            } else if !now.retrying {
                // EBUSY: the pipe holds more than its own size; again once its reader has taken some.
                state.withLock { $0.retrying = true }
                channel.eventLoop.scheduleTask(in: retryEvery) { [self] in
                    state.withLock { $0.retrying = false }
                    apply(channel)
                }
            }
        }
    }

    /// The pipe is closed: an enlarged one no longer counts.
    private func closed() {
        let wasLarge = state.withLock { s in
            defer { s.original = nil }
            return s.original != nil
        }
        if wasLarge { budget.giveBack() }
    }

    /// An integer in a file of /proc, or nil.
    static func procValue(_ path: String) -> Int? {
        (try? String(contentsOfFile: path, encoding: .utf8)).flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }
}

/// How many pipes may be enlarged at once.
final class PipeBudget: Sendable {
    /// This daemon's: unlimited for root; else half of the per-user soft quota in enlarged pipes (none set: unlimited).
    static let shared = PipeBudget(limit: {
        guard geteuid() != 0, let pages = PipeSizer.procValue("/proc/sys/fs/pipe-user-pages-soft"), pages > 0 else { return .max }
        return pages * Int(getpagesize()) / 2 / PipeSizer.large
    }())

    let limit: Int
    private let used = Atomic<Int>(0)

    init(limit: Int) {
        self.limit = limit
    }

    /// Takes one if any is left.
    func take() -> Bool {
        var current = used.load(ordering: .relaxed)
        while current < limit {
            let (exchanged, original) = used.compareExchange(expected: current, desired: current + 1, ordering: .relaxed)
            if exchanged { return true }
            current = original
        }
        return false
    }

    func giveBack() {
        used.subtract(1, ordering: .relaxed)
    }

    var inUse: Int { used.load(ordering: .relaxed) }
}
