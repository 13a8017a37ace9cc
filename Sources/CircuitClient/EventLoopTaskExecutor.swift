import NIOCore

/// Runs a task's jobs on a NIO event loop. A task that prefers the executor of the loop its connection reads and
/// writes on (`withTaskExecutorPreference`) makes its calls with no thread hop: the request's write, the answer's read
/// and the task's resumption all happen on that one thread, where otherwise each call wakes the loop's thread to write
/// and a thread of Swift's global executor to resume (a node's connections handle their requests this way; so can a
/// client that makes many small calls, such as `WireConnection.taskExecutor`'s users). Nothing such a task does may
/// block: its waits must be awaits.
public final class EventLoopTaskExecutor: TaskExecutor {
    public let eventLoop: any EventLoop

    public init(_ eventLoop: any EventLoop) { self.eventLoop = eventLoop }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        eventLoop.execute { job.runSynchronously(on: self.asUnownedTaskExecutor()) }
    }
}
