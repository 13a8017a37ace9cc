import CircuitAPI
import CircuitSecurity
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// A connection to one node in the binary protocol (`Wire`, docs/wire-protocol.md): the records' calls of
/// `CircuitClient`, with any number in flight at once on the one connection and each answered as soon as it is done.
/// For a client that makes many small calls (a registry, a lock service, a benchmark); `CircuitClient` over HTTP is
/// the general one, and finds another node when one is down, which this connection does not: it fails, and the
/// caller connects to another.
///
/// Any node serves every call (a follower hands writes to the leader and asks it for read indexes); with no leader
/// known a call fails with `no_leader`, to be retried.
public final class WireConnection: Sendable {
    public let endpoint: String
    private let channel: any Channel
    /// The node's refusal of the connection as a whole, once it came: every later call fails with it.
    private let refusal: NIOLockedValueBox<APIError?>
    /// The executor of the thread this connection reads and writes on. Calls from a task that prefers it
    /// (`withTaskExecutorPreference(connection.taskExecutor) { ... }`) cost no thread hop (without it, each call
    /// wakes this thread to write and a thread of the global executor to resume the caller). Only for tasks that never
    /// block.
    public let taskExecutor: EventLoopTaskExecutor

    private init(endpoint: String, channel: any Channel, refusal: NIOLockedValueBox<APIError?>) {
        self.endpoint = endpoint
        self.channel = channel
        self.refusal = refusal
        self.taskExecutor = EventLoopTaskExecutor(channel.eventLoop)
    }

    /// Connects to `endpoint` (`host:port` of a node's API). `timeout`: for the connection, and for each call's answer
    /// (a call unanswered that long fails; the connection goes on).
    public static func connect(
        to endpoint: String, tls: TLSFiles? = ClientTLS.default, timeout: Duration = .seconds(10)
    ) async throws(CircuitClientError) -> WireConnection {
        guard let colon = endpoint.lastIndex(of: ":"), let port = Int(endpoint[endpoint.index(after: colon)...]) else {
            throw .unreachable(endpoints: [endpoint], why: "\(endpoint) is not host:port")
        }
        let refusal = NIOLockedValueBox<APIError?>(nil)
        let channel: any Channel
        do {
            channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connectTimeout(TimeAmount(timeout))
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try ClientTLS.add(tls, to: channel)
                        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(WireFrameDecoder()))
                        try channel.pipeline.syncOperations.addHandler(WireClientHandler(timeout: TimeAmount(timeout), refusal: refusal))
                    }
                }
                .connect(host: String(endpoint[..<colon]), port: port).get()
        } catch {
            throw .unreachable(endpoints: [endpoint], why: "\(error)")
        }
        // The hello waits for a TLS handshake, which has no deadline of its own. The deadline is cancelled on the loop
        // as the hello is written, not when this task resumes: on a loaded machine that can come later than the
        // deadline, which would close a connection that was fine.
        let deadline = channel.eventLoop.scheduleTask(in: TimeAmount(timeout)) { channel.close(promise: nil) }
        let hello = channel.eventLoop.makePromise(of: Void.self)
        hello.futureResult.whenComplete { _ in deadline.cancel() }
        channel.writeAndFlush(WireClientHandler.Outbound.hello, promise: hello)
        do {
            try await hello.futureResult.get()
        } catch {
            channel.close(promise: nil)
            throw .unreachable(endpoints: [endpoint], why: "\(error)")
        }
        return WireConnection(endpoint: endpoint, channel: channel, refusal: refusal)
    }

    /// A record: linearizable unless `stale`. A record absent fails with the API's `not_found`.
    public func get(_ path: String, stale: Bool = false) async throws(CircuitClientError) -> Wire.Record {
        guard case .record(let record) = try await call(.get(path: path, stale: stale)) else {
            throw .badAnswer("a read of \(path) was answered with no record")
        }
        return record
    }

    /// Sets a record. `version`: only if the record is at this version (compare-and-set; 0: only if absent).
    /// `session`: tie the record to a session (ephemeral). As `CircuitClient.put`.
    @discardableResult
    public func put(
        _ path: String, _ value: [UInt8], version: UInt64? = nil, session: UInt64 = 0
    ) async throws(CircuitClientError) -> WriteView {
        switch version {
        case nil: try await written(.put(path: path, value: value, session: session))
        case 0: try await written(.create(path: path, value: value, session: session, sequential: false))
        case let version?: try await written(.compareAndSet(path: path, version: version, value: value))
        }
    }

    /// Creates `prefix` followed by the parent's next sequence number; the answer's `path` names it.
    @discardableResult
    public func createSequential(_ prefix: String, _ value: [UInt8], session: UInt64 = 0) async throws(CircuitClientError) -> WriteView {
        try await written(.create(path: prefix, value: value, session: session, sequential: true))
    }

    @discardableResult
    public func delete(_ path: String, version: UInt64? = nil) async throws(CircuitClientError) -> WriteView {
        try await written(.delete(path: path, version: version))
    }

    public func close() async {
        try? await channel.close().get()
    }

    private func written(_ operation: Wire.Operation) async throws(CircuitClientError) -> WriteView {
        guard case .written(let view) = try await call(operation) else { throw .badAnswer("a write was answered with a record") }
        return view
    }

    private func call(_ operation: Wire.Operation) async throws(CircuitClientError) -> Wire.Result {
        if let size = operation.valueSize, size > Wire.maxValue {
            throw .api(APIError(status: 413, code: "too_large", message: "a value of \(size) bytes is larger than the limit of \(Wire.maxValue)"))
        }
        // A path longer than any name may be (1,024 bytes) would be refused by the node; far longer, it would not fit
        // a frame beside a large value, and the node would refuse the connection as a whole.
        if operation.path.utf8.count > Wire.maxPath {
            throw .api(APIError(status: 400, code: "invalid_name", message: "a path of \(operation.path.utf8.count) bytes is longer than \(Wire.maxPath)"))
        }
        let answer = channel.eventLoop.makePromise(of: Wire.Result.self)
        channel.writeAndFlush(WireClientHandler.Outbound.call(operation, answer)).cascadeFailure(to: answer)
        let result: Wire.Result
        do {
            result = try await answer.futureResult.get()
        } catch let error as APIError {
            throw .api(error)
        } catch {
            if let refused = refusal.withLockedValue({ $0 }) { throw .api(refused) }
            // A write that got no answer may have taken effect; a read that got none did nothing.
            throw operation.isWrite ? .noAnswer(endpoint: endpoint, why: "\(error)") : .unreachable(endpoints: [endpoint], why: "\(error)")
        }
        if case .failed(let error) = result { throw .api(error) }
        return result
    }
}

/// Why a call on a wire connection got no answer.
struct WireConnectionError: Error, CustomStringConvertible {
    var description: String
}

/// The client's end of a wire connection: numbers each call, writes it, and completes its promise with the answer
/// that carries its number; fails every call waiting when the connection ends or the node refuses it as a whole.
final class WireClientHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = Outbound
    typealias OutboundOut = ByteBuffer

    enum Outbound {
        case hello
        case call(Wire.Operation, EventLoopPromise<Wire.Result>)
    }

    private struct Waiting {
        var answer: EventLoopPromise<Wire.Result>
        var deadline: NIODeadline
    }

    private let timeout: TimeAmount
    private let refusal: NIOLockedValueBox<APIError?>
    private var nextID: UInt64 = 1
    private var waiting: [UInt64: Waiting] = [:]
    /// Fails the calls past their deadline, every tenth of the timeout (10 ms to 1 s) while any waits: one timer for
    /// the connection, not one scheduled and cancelled for every call.
    private var sweep: RepeatedTask?
    /// Once set, the connection is done: new calls fail with this.
    private var failure: (any Error)?

    init(timeout: TimeAmount, refusal: NIOLockedValueBox<APIError?>) {
        self.timeout = timeout
        self.refusal = refusal
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch unwrapOutboundIn(data) {
        case .hello:
            context.write(wrapOutboundOut(context.channel.allocator.buffer(bytes: Wire.hello)), promise: promise)
        case .call(let operation, let answer):
            if let failure {
                answer.fail(failure)
                promise?.fail(failure)
                return
            }
            let id = nextID
            nextID += 1
            waiting[id] = Waiting(answer: answer, deadline: .now() + timeout)
            if sweep == nil { startSweep(context: context) }
            var buffer = context.channel.allocator.buffer(capacity: 64)
            Wire.write(Wire.Request(id: id, operation), to: &buffer)
            context.write(wrapOutboundOut(buffer), promise: promise)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let answer: Wire.Answer
        do {
            answer = try Wire.answer(from: unwrapInboundIn(data))
        } catch {
            fail(WireConnectionError(description: "an unreadable answer: \(error)"), context: context)
            return
        }
        if answer.id == Wire.connectionID {
            // The node refused the connection as a whole (a bad hello, no certificate, a frame too large).
            if case .failed(let error) = answer.result {
                refusal.withLockedValue { $0 = error }
                fail(error, context: context)
            } else {
                fail(WireConnectionError(description: "an answer to no request"), context: context)
            }
            return
        }
        guard let call = waiting.removeValue(forKey: answer.id) else { return }  // timed out meanwhile
        call.answer.succeed(answer.result)
    }

    func channelInactive(context: ChannelHandlerContext) {
        fail(WireConnectionError(description: "the connection closed"), context: context)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        fail(WireConnectionError(description: "the connection failed: \(error)"), context: context)
    }

    private func fail(_ error: any Error, context: ChannelHandlerContext) {
        if failure == nil { failure = error }
        let calls = waiting
        waiting.removeAll()
        sweep?.cancel()
        sweep = nil
        for call in calls.values { call.answer.fail(failure!) }
        context.close(promise: nil)
    }

    private func startSweep(context: ChannelHandlerContext) {
        let period = TimeAmount.nanoseconds(min(max(timeout.nanoseconds / 10, 10_000_000), 1_000_000_000))
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        sweep = context.eventLoop.scheduleRepeatedTask(initialDelay: period, delay: period) { [timeout] _ in
            let handler = bound.value
            let now = NIODeadline.now()
            for (id, call) in handler.waiting where call.deadline <= now {
                handler.waiting[id] = nil
                call.answer.fail(WireConnectionError(description: "no answer within \(timeout)"))
            }
            if handler.waiting.isEmpty {
                handler.sweep?.cancel()
                handler.sweep = nil
            }
        }
    }
}
