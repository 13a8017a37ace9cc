/// Where a `RaftDriver`'s turns run when it has no thread of its own (`RaftDriver.Options.executor`): a serial
/// executor, such as the NIO event loop that carries the peers' connections. The driver's state is touched only by
/// its turns, so the executor must never run two pieces of work at once, and must run them in the order given.
public protocol RaftLoopExecutor: Sendable {
    /// Runs `work` after what is queued now.
    func execute(_ work: @escaping @Sendable () -> Void)
    /// Runs `work` every `interval` until the answer is cancelled.
    func every(_ interval: Duration, _ work: @escaping @Sendable () -> Void) -> any RaftLoopTimer
    /// Whether the calling thread is the executor's own (work given to it from here runs only after the caller).
    var isCurrent: Bool { get }
}

/// A repeating timer of a `RaftLoopExecutor`.
public protocol RaftLoopTimer: Sendable {
    func cancel()
}
