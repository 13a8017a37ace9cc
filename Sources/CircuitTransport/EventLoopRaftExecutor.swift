import CircuitRaft
import NIOCore

/// A Raft driver's turns on a NIO event loop: the loop that also carries the transport's connections, so a message
/// read from a peer is stepped, and its answer written, on the thread that read it.
public struct EventLoopRaftExecutor: RaftLoopExecutor {
    public let eventLoop: any EventLoop

    public init(_ eventLoop: any EventLoop) { self.eventLoop = eventLoop }

    public func execute(_ work: @escaping @Sendable () -> Void) { eventLoop.execute(work) }

    public func every(_ interval: Duration, _ work: @escaping @Sendable () -> Void) -> any RaftLoopTimer {
        let delay = TimeAmount(interval)
        return Timer(task: eventLoop.scheduleRepeatedTask(initialDelay: delay, delay: delay) { _ in work() })
    }

    public var isCurrent: Bool { eventLoop.inEventLoop }

    private struct Timer: RaftLoopTimer {
        let task: RepeatedTask
        func cancel() { task.cancel() }
    }
}
