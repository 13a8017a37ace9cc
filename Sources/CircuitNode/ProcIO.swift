import CircuitAPI
import NIOCore
import NIOPosix
import Synchronization

/// A process's standard streams, held by its host: the write end of its stdin pipe and the read ends of its stdout
/// and stderr pipes, as SwiftNIO pipe channels.
///
/// Back-pressure all the way, and no unbounded buffer: an output stream is read from its pipe only while its buffer
/// holds less than `ProcOutput.limit` bytes, so a process whose output nobody reads blocks once the pipe and that
/// buffer are full (as a process writing to a full pipe does), and nothing is dropped. Stdin is written one chunk at a
/// time, each after the last has gone into the pipe.
///
/// One reader of each stream at a time (another is refused, 409 `busy`); readers that come one after another each get
/// what the last left. What a process wrote before it ended stays readable until its element is removed.
final class ProcIO: Sendable {
    let stdin: ProcInput
    let stdout: ProcOutput
    let stderr: ProcOutput

    /// Takes the parent's ends of the three pipes (`stdin` to write; `stdout` and `stderr` to read).
    init(stdin: CInt, stdout: CInt, stderr: CInt) {
        self.stdin = ProcInput(fd: stdin)
        self.stdout = ProcOutput(fd: stdout)
        self.stderr = ProcOutput(fd: stderr)
    }

    /// The element is gone: every stream is closed and its readers end.
    func close() {
        stdin.close()
        stdout.close()
        stderr.close()
    }

    func output(_ name: String) -> ProcOutput? {
        switch name {
        case "stdout": return stdout
        case "stderr": return stderr
        default: return nil
        }
    }
}

/// The write end of a process's stdin. While a writer holds it, its pipe is made larger (`PipeSizer`): a MiB of a
/// client's request goes into the pipe in one write instead of sixteen turns of 64 KiB.
final class ProcInput: Sendable {
    private let channel: EventLoopFuture<any Channel>
    private struct State {
        var busy = false
        var closed = false
    }
    private let state = Mutex(State())
    private let sizer: PipeSizer

    init(fd: CInt, budget: PipeBudget = .shared) {
        let future = NIOPipeBootstrap(group: MultiThreadedEventLoopGroup.singleton).takingOwnershipOfDescriptor(output: fd)
        future.whenFailure { _ in Glibc.close(fd) }
        channel = future
        sizer = PipeSizer(fd: fd, channel: future, budget: budget)
    }

    enum Refusal: Error { case busy, closed }

    /// Takes the stream for one writer (and makes the pipe larger while it writes); `finish` gives it back (closing
    /// stdin unless `keepOpen`).
    func acquire() throws(Refusal) {
        try state.withLock { s throws(Refusal) in
            if s.closed { throw .closed }
            if s.busy { throw .busy }
            s.busy = true
        }
        sizer.streaming(true)
    }

    /// The client writing went away while its bytes waited for the pipe.
    struct WriterGone: Error {}

    /// How often a write waiting for the pipe looks whether its client is still connected.
    static let clientCheck: TimeAmount = .seconds(1)

    /// Writes `bytes`; returns once they are in the pipe. If the writing client goes away first (while the process
    /// reads nothing), throws `WriterGone` within `clientCheck`; the bytes stay queued for the pipe. Gone: its
    /// connection (`client`) was reset or closed, or the client closed its side (a FIN: the server allows half-closed
    /// connections, so the channel stays active, and the FIN waits behind the body nobody reads; the socket's TCP
    /// state says so). A client closes its side in the middle of a request's body only when it will not finish it.
    /// The connection is looked at only while a write waits, by a timer of that write's: a callback on its close
    /// would stay until it closes, one more for every write of a long stream.
    func write(_ bytes: ByteBuffer, unlessGone client: (any Channel)? = nil) async throws {
        let channel = try await channel.get()
        let written: EventLoopFuture<Void> = channel.writeAndFlush(bytes)
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
            let once = Mutex<CheckedContinuation<Void, any Error>?>(c)
            @Sendable func answer(_ result: Result<Void, any Error>) {
                once.withLock { c in
                    defer { c = nil }
                    return c
                }?.resume(with: result)
            }
            let check = client.map { client in
                client.eventLoop.scheduleRepeatedTask(initialDelay: Self.clientCheck, delay: Self.clientCheck) { task in
                    let gone: EventLoopFuture<Bool> =
                        !client.isActive
                        ? client.eventLoop.makeSucceededFuture(true)
                        : (client as? any SocketOptionProvider)?.getTCPInfo().map { Int($0.tcpi_state) == TCP_CLOSE_WAIT }
                            ?? client.eventLoop.makeSucceededFuture(false)
                    gone.whenSuccess { gone in
                        guard gone else { return }
                        task.cancel()
                        answer(.failure(WriterGone()))
                    }
                }
            }
            written.whenComplete { result in
                check?.cancel()
                answer(result)
            }
        }
    }

    func finish(keepOpen: Bool) {
        let close = state.withLock { s in
            s.busy = false
            if !keepOpen { s.closed = true }
            return !keepOpen
        }
        if close { self.close() } else { sizer.streaming(false) }
    }

    func close() {
        state.withLock { $0.closed = true }
        channel.whenSuccess { $0.close(promise: nil) }
    }
}

/// The read end of a process's stdout or stderr, with a bounded buffer.
///
/// While a reader holds the stream its pipe is made larger (`PipeSizer`) and read in up to a MiB at once: the child
/// and this host then trade a MiB a turn instead of Linux's default 64 KiB.
final class ProcOutput: Sendable {
    /// Bytes held beyond the pipe's own buffer while nobody reads: reading pauses once they reach it (a read, of up
    /// to `largestRead`, may take them past it).
    static let limit = 64 << 10
    /// The largest read of the pipe.
    static let largestRead = 1 << 20

    private struct State {
        var chunks = CircularBuffer<ByteBuffer>()
        var bytes = 0
        var ended = false
        var busy = false
        /// The pipe is not being read because the buffer is full.
        var paused = false
        var waiter: CheckedContinuation<Void, Never>?
    }
    private let state = Mutex(State())
    private let channel: EventLoopFuture<any Channel>
    private let sizer: PipeSizer

    init(fd: CInt, budget: PipeBudget = .shared) {
        let box = Mutex<ProcOutput?>(nil)
        let future = NIOPipeBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelOption(.autoRead, value: false)
            .channelOption(.allowRemoteHalfClosure, value: true)
            // One read a time asked (NIO's default is up to four in a row), so the buffer passes `limit` by one read.
            .channelOption(.maxMessagesPerRead, value: 1)
            .channelOption(
                .recvAllocator,
                value: NotingLargeReads(base: AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 2048, maximum: Self.largestRead)))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(OutputPump { box.withLock { $0 } })
                }
            }
            .takingOwnershipOfDescriptor(input: fd)
        future.whenFailure { _ in Glibc.close(fd) }
        channel = future
        sizer = PipeSizer(fd: fd, channel: future, budget: budget)
        box.withLock { $0 = self }
        // Start reading once the pump is in place (it may have been added before `self` was in the box).
        future.whenSuccess { $0.read() }
    }

    /// Takes the stream for one reader (and makes the pipe larger while it reads); `release` gives it back.
    func acquire() -> Bool {
        let taken = state.withLock { s in
            if s.busy { return false }
            s.busy = true
            return true
        }
        if taken { sizer.streaming(true) }
        return taken
    }

    /// Gives the stream back. What the reader left is kept compact: a chunk read into a buffer more than twice its
    /// size (reads of up to a MiB) is copied into one of its own, so that held chunks do not hold read buffers.
    func release() {
        let waiter = state.withLock { s in
            s.busy = false
            for i in s.chunks.indices { s.chunks[i] = Self.compact(s.chunks[i]) }
            defer { s.waiter = nil }
            return s.waiter
        }
        sizer.streaming(false)
        waiter?.resume()
    }

    /// The bytes held for the next reader.
    var heldBytes: Int { state.withLock { $0.bytes } }

    /// A chunk whose buffer is more than twice its size.
    static func wasteful(_ chunk: ByteBuffer) -> Bool { chunk.capacity > 2 * chunk.readableBytes }

    /// The chunk in a buffer of its own size if its buffer is wasteful, else as it is.
    static func compact(_ chunk: ByteBuffer) -> ByteBuffer { wasteful(chunk) ? ByteBuffer(bytes: chunk.readableBytesView) : chunk }

    /// The next bytes: the chunks there are, in order, up to `bytes` in all (at least one chunk, however large),
    /// waiting for the first; nil once the process has closed the stream (or its element is gone) and all was read.
    func next(upTo bytes: Int = largestRead) async -> [ByteBuffer]? {
        while true {
            enum Step { case chunks([ByteBuffer], resume: Bool), end, wait }
            let step: Step = state.withLock { s in
                guard let first = s.chunks.popFirst() else { return s.ended ? .end : .wait }
                var taken = [first]
                var total = first.readableBytes
                while let chunk = s.chunks.first, total + chunk.readableBytes <= bytes {
                    s.chunks.removeFirst()
                    taken.append(chunk)
                    total += chunk.readableBytes
                }
                s.bytes -= total
                let resume = s.paused && s.bytes < Self.limit
                if resume { s.paused = false }
                return .chunks(taken, resume: resume)
            }
            switch step {
            case .chunks(let chunks, let resume):
                if resume { channel.whenSuccess { $0.read() } }
                return chunks
            case .end:
                return nil
            case .wait:
                if Task.isCancelled { return nil }
                await withTaskCancellationHandler {
                    await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                        let ready = state.withLock { s -> Bool in
                            if !s.chunks.isEmpty || s.ended || Task.isCancelled { return true }
                            s.waiter = c
                            return false
                        }
                        if ready { c.resume() }
                    }
                } onCancel: {
                    let waiter = state.withLock { s in
                        defer { s.waiter = nil }
                        return s.waiter
                    }
                    waiter?.resume()
                }
                if Task.isCancelled { return nil }
            }
        }
    }

    /// Puts back chunks a reader took but could not pass on (its client went away): the next reader gets them first.
    func unread(_ chunks: [ByteBuffer]) {
        state.withLock { s in
            for chunk in chunks.reversed() {
                s.chunks.prepend(chunk)
                s.bytes += chunk.readableBytes
            }
        }
    }

    /// From the pump: bytes read from the pipe. True if there is room for more.
    /// While nobody reads, a chunk is kept compact (as `release` keeps what a reader left); a reader takes chunks as
    /// they come, so theirs are passed on as read, not copied.
    fileprivate func append(_ buffer: ByteBuffer) -> Bool {
        let (waiter, more): (CheckedContinuation<Void, Never>?, Bool) = state.withLock { s in
            s.chunks.append(s.busy ? buffer : Self.compact(buffer))
            s.bytes += buffer.readableBytes
            let more = s.bytes < Self.limit
            if !more { s.paused = true }
            defer { s.waiter = nil }
            return (s.waiter, more)
        }
        waiter?.resume()
        return more
    }

    /// From the pump: the process closed its end (or the pipe failed).
    fileprivate func end() {
        let waiter = state.withLock { s in
            s.ended = true
            defer { s.waiter = nil }
            return s.waiter
        }
        waiter?.resume()
    }

    func close() {
        end()
        channel.whenSuccess { $0.close(promise: nil) }
    }
}

/// Linux's fcntl commands for a pipe's size (<fcntl.h>: F_LINUX_SPECIFIC_BASE + 7 and + 8), which Swift's Glibc
/// module does not export.
enum PipeSize {
    static let set: CInt = 1031  // F_SETPIPE_SZ
    static let get: CInt = 1032  // F_GETPIPE_SZ
}

/// Reads a pipe into its `ProcOutput` while the buffer has room (auto-read is off: each read is asked for).
private final class OutputPump: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let output: () -> ProcOutput?

    init(_ output: @escaping () -> ProcOutput?) {
        self.output = output
    }

    /// Whether the buffer had room after the last bytes: then the next read is asked for when this one completes.
    private var more = true

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let output = output() else { return }
        more = output.append(unwrapInboundIn(data))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if more { context.read() }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case ChannelEvent.inputClosed = event {
            output()?.end()
            context.close(promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        output()?.end()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        output()?.end()
        context.close(promise: nil)
    }
}
