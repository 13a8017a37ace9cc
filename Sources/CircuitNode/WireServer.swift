import CircuitAPI
import CircuitClient
import CircuitSecurity
import CircuitStateMachine
import HummingbirdCore
import Logging
import NIOCore
import NIOSSL
import ServiceLifecycle

/// What the binary protocol (`Wire`, docs/wire-protocol.md) does with a request: the records' operations of the HTTP
/// API, on this node's control state. Writes go to the leader over the peer connection when this node follows, and
/// linearizable reads ask it for a read index, as the HTTP API's do; there is no HTTP forwarding to fall back on, so
/// with no leader known a request fails with `no_leader` and the client retries.
public struct WireRecords: Sendable {
    let service: ControlService

    public init(service: ControlService) {
        self.service = service
    }

    func answer(_ request: Wire.Request) async -> Wire.Answer {
        do {
            return Wire.Answer(id: request.id, try await result(of: request.operation))
        } catch let error as APIError {
            return Wire.Answer(id: request.id, .failed(error))
        } catch let error as ControlServiceError {
            return Wire.Answer(id: request.id, .failed(APIError.from(error)))
        } catch {
            return Wire.Answer(id: request.id, .failed(APIError(status: 500, code: "internal", message: "\(error)")))
        }
    }

    private func result(of operation: Wire.Operation) async throws -> Wire.Result {
        if let size = operation.valueSize, size > Wire.maxValue {
            throw APIError(status: 413, code: "too_large", message: "a value of \(size) bytes is larger than the limit of \(Wire.maxValue)")
        }
        switch operation {
        case .get(let path, let stale):
            let path = try Self.recordPath(path)
            let record: Wire.Record? = try await service.read(stale ? .stale : .linearizable) { state in
                guard let anchor = state.anchors[path], case .record(let bytes) = anchor.element else { return nil }
                return Wire.Record(
                    value: bytes, version: anchor.version, createRevision: anchor.createRevision, modRevision: anchor.modRevision,
                    session: anchor.session, revision: state.revision)
            }
            guard let record else { throw APIError.from(.notFound(path: path)) }
            return .record(record)
        case .put(let path, let value, let session):
            return try await write(.put(path: try Self.recordPath(path), value: value, session: session))
        case .create(let path, let value, let session, let sequential):
            return try await write(.create(path: try Self.recordPath(path), element: .record(value), session: session, sequential: sequential))
        case .compareAndSet(let path, let version, let value):
            let path = try Self.recordPath(path)
            guard version > 0 else {
                throw APIError.badRequest("compare-and-set of \(path) at version 0: a record absent is made with create")
            }
            return try await write(.compareAndSet(path: path, version: version, value: value))
        case .delete(let path, let version):
            return try await write(.delete(path: try Self.recordPath(path), version: version))
        }
    }

    private func write(_ command: Command) async throws -> Wire.Result {
        switch try await service.execute(command, forward: true) {
        case .ok(let revision, let path, let version, let session):
            return .written(WriteView(revision: revision, path: path, version: version, session: session))
        case .failed(let error):
            throw APIError.from(error)
        }
    }

    /// `/records/a/b`, or `/a/b` taken as under `/records` (as the HTTP API's `/v1/records/a/b`), checked by the
    /// namespace's rules.
    static func recordPath(_ path: String) throws(APIError) -> String {
        let full = path == Names.recordsRoot || path.hasPrefix(Names.recordsRoot + "/")
            ? path : Names.recordsRoot + (path.hasPrefix("/") ? "" : "/") + path
        if let error = Names.validate(full) { throw APIError.from(error) }
        return full
    }
}

/// The API port's connections, either protocol: one that opens with `Wire.hello` speaks the binary protocol, any
/// other is handed to `base` (Hummingbird's HTTP/1.1) with the bytes read so far. Behind TLS when the cluster has it
/// (this sits after `ClusterTLSChannel`'s handler), so the first bytes looked at are the decrypted ones.
struct WireOrHTTPChannel<Base: ServerChildChannel>: ServerChildChannel {
    /// The connection, and which protocol it turns out to speak once its first bytes came. (NIO registers a new
    /// connection, and so reads from it, only once `setup` is done: the choice cannot be made inside it.)
    struct Value: ServerChildChannelValue {
        let channel: any Channel
        let chosen: EventLoopFuture<Chosen>
    }

    enum Chosen: Sendable {
        case http(Base.Value)
        case wire
    }

    let base: Base
    /// Nil on a worker, which holds no control state: a wire connection is told to go to a member.
    let records: WireRecords?
    /// Whether connections are TLS: then the client's certificate decides what it may do.
    let tls: Bool
    let logger: Logger

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        let chosen = channel.eventLoop.makePromise(of: Chosen.self)
        let sniffer = ProtocolSniffer(chosen: chosen) { (isWire: Bool) -> EventLoopFuture<Chosen> in
            guard isWire else { return base.setup(channel: channel, logger: logger).map { .http($0) } }
            return wireSetup(channel: channel)
        }
        return channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(sniffer)
            return Value(channel: channel, chosen: chosen.futureResult)
        }
    }

    /// Checks the certificate (with TLS) and puts the protocol's handlers in place.
    private func wireSetup(channel: any Channel) -> EventLoopFuture<Chosen> {
        guard let records else {
            return refuseWireConnection(
                channel, APIError(status: 421, code: "not_a_member", message: "this host is a worker: speak the wire protocol to a member"))
        }
        let grant: EventLoopFuture<Grant?> = tls
            ? channel.nioSSL_peerCertificate().flatMapThrowing { certificate -> Grant? in try ConnectionGrants.grant(of: certificate) }
            : channel.eventLoop.makeSucceededFuture(nil)
        let logger = self.logger
        return grant.flatMap { grant in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(WireFrameDecoder()))
                try channel.pipeline.syncOperations.addHandler(WireServerHandler(records: records, grant: grant, logger: logger))
                return Chosen.wire
            }
        }.flatMapError { error in
            refuseWireConnection(channel, error as? APIError ?? APIError(status: 500, code: "internal", message: "\(error)"))
        }
    }

    func handle(value: Value, logger: Logger) async {
        let channel = value.channel
        // A connection closed or refused before it chose has nothing more to do; one that sends nothing is closed by
        // a stop of the daemon.
        let chosen = await withGracefulShutdownHandler {
            await withTaskCancellationHandler {
                try? await value.chosen.get()
            } onCancel: {
                channel.close(promise: nil)
            }
        } onGracefulShutdown: {
            channel.close(promise: nil)
        }
        guard let chosen else { return }
        switch chosen {
        case .http(let http):
            await base.handle(value: http, logger: logger)
        case .wire:
            // The handlers do the work; this waits for the connection's end. A graceful stop lets the requests read
            // so far finish, then closes; a cancellation (the stop's time is up) closes at once.
            await withGracefulShutdownHandler {
                await withTaskCancellationHandler {
                    try? await channel.closeFuture.get()
                } onCancel: {
                    channel.close(promise: nil)
                }
            } onGracefulShutdown: {
                channel.pipeline.fireUserInboundEventTriggered(WireServerHandler.Quiesce())
            }
        }
    }
}

/// Answers a wire connection itself with `error`, then closes it; the future fails with `error`.
func refuseWireConnection<T>(_ channel: any Channel, _ error: APIError) -> EventLoopFuture<T> {
    writeLastAnswer(Wire.Answer(id: Wire.connectionID, .failed(error)), on: channel)
        .flatMapResult { _ in Result<T, any Error>.failure(error) }
}

/// Writes `answer`, the connection's last, and closes the connection once it is written (or failed to be).
@discardableResult
func writeLastAnswer(_ answer: Wire.Answer, on channel: any Channel) -> EventLoopFuture<Void> {
    var buffer = channel.allocator.buffer(capacity: 128)
    Wire.write(answer, to: &buffer)
    let written = channel.writeAndFlush(buffer)
    written.whenComplete { _ in channel.close(promise: nil) }
    return written
}

/// The first handler of an API connection: holds what is read until the first four bytes tell the protocol, has the
/// pipeline set up for it (`configure`), then passes the held bytes on and leaves the pipeline.
final class ProtocolSniffer<Value: Sendable>: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private let chosen: EventLoopPromise<Value>
    private let configure: (Bool) -> EventLoopFuture<Value>
    private var held: ByteBuffer?
    private var decided = false

    init(chosen: EventLoopPromise<Value>, configure: @escaping (Bool) -> EventLoopFuture<Value>) {
        self.chosen = chosen
        self.configure = configure
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        if held == nil { held = bytes } else { held!.writeBuffer(&bytes) }
        guard !decided, let first = held!.getInteger(at: held!.readerIndex, as: UInt8.self) else { return }
        // No HTTP request and no TLS record begins with a NUL byte: anything else is HTTP at once.
        let isWire = first == 0
        if isWire {
            guard held!.readableBytes >= Wire.hello.count else { return }
            let hello = held!.readBytes(length: Wire.hello.count)!
            guard hello == Wire.hello else {
                decided = true
                let version = hello[1...2] == Wire.hello[1...2] ? "version \(hello[3])" : "protocol"
                let error = APIError(
                    status: 400, code: "bad_hello", message: "unknown wire \(version): this node speaks wire version \(Wire.version) and HTTP/1.1")
                let refused: EventLoopFuture<Value> = refuseWireConnection(context.channel, error)
                refused.cascade(to: chosen)
                return
            }
        }
        decided = true
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        configure(isWire).whenComplete { result in
            let (sniffer, context) = bound.value
            switch result {
            case .success(let value):
                sniffer.chosen.succeed(value)
                if let held = sniffer.held, held.readableBytes > 0 { context.fireChannelRead(sniffer.wrapInboundOut(held)) }
                sniffer.held = nil
                context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
            case .failure(let error):
                sniffer.chosen.fail(error)
                context.close(promise: nil)
            }
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !decided { chosen.fail(ChannelError.eof) }
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // A client that closes its side before choosing (a port probe): the server allows half-closed connections,
        // so without this the connection would stay open until the daemon stops.
        if !decided, (event as? ChannelEvent) == .inputClosed {
            decided = true
            chosen.fail(ChannelError.eof)
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if !decided {
            chosen.fail(error)
            context.close(promise: nil)
        }
        context.fireErrorCaught(error)
    }
}

/// Serves one wire connection: each frame a request, run as a task on this connection's event loop, its answer
/// written when done (in any order; the id says whose). Answers that finish in one turn of the loop go out in one
/// flush.
///
/// Bounded: at most `maxInFlight` requests run at once, and none starts while the connection's answers wait to be
/// written past NIO's high-water mark (a client that sends and does not read). Requests read meanwhile wait in a
/// queue, and the connection is not read again until they have started: what one read brings in (a few MiB of
/// frames at most) is the most that waits.
final class WireServerHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Asks the handler to finish the requests it has read and then close the connection (a graceful stop).
    struct Quiesce: Sendable {}

    static let maxInFlight = 1024

    private let records: WireRecords
    private let grant: Grant?
    private let logger: Logger
    private var executor: EventLoopTaskExecutor?
    private var inFlight = 0
    /// Requests read and not started, and answers made without running anything (refusals), in the order read.
    private var queued = CircularBuffer<Queued>()

    private enum Queued {
        case request(Wire.Request)
        case answer(Wire.Answer)
    }
    private var readHeld = false
    private var flushScheduled = false
    private var active = true
    private var quiescing = false

    init(records: WireRecords, grant: Grant?, logger: Logger) {
        self.records = records
        self.grant = grant
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        executor = EventLoopTaskExecutor(context.eventLoop)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard active, !quiescing else { return }
        let frame = unwrapInboundIn(data)
        let request: Wire.Request
        do {
            request = try Wire.request(from: frame)
        } catch {
            // The frame's bounds are sound (its length was read), so the connection goes on after the refusal, when
            // the refusal can name the request. A frame too short to hold an id cannot be answered by id.
            guard let id = frame.getInteger(at: frame.readerIndex, as: UInt64.self), id != Wire.connectionID else {
                refuse(APIError.badRequest(error.description), context: context)
                return
            }
            enqueue(.answer(Wire.Answer(id: id, .failed(APIError.badRequest(error.description)))), context: context)
            return
        }
        guard request.id != Wire.connectionID else {
            refuse(APIError.badRequest("request id 0 is reserved for answers to the connection itself"), context: context)
            return
        }
        if let grant {
            let needed: AccessRole = request.operation.isWrite ? .write : .read
            guard grant.allows(needed) else {
                let refusal = APIError.forbidden(
                    "records need the \(needed.rawValue) role to be \(request.operation.isWrite ? "written" : "read")", grant: grant)
                enqueue(.answer(Wire.Answer(id: request.id, .failed(refusal))), context: context)
                return
            }
        }
        enqueue(.request(request), context: context)
    }

    private func enqueue(_ item: Queued, context: ChannelHandlerContext) {
        queued.append(item)
        startQueued(context: context)
    }

    /// Starts queued requests (and writes queued answers) while there is room and the answers are being taken.
    private func startQueued(context: ChannelHandlerContext) {
        while inFlight < Self.maxInFlight, context.channel.isWritable, let item = queued.popFirst() {
            let request: Wire.Request
            switch item {
            case .answer(let answer):
                send(answer, context: context)
                continue
            case .request(let r):
                request = r
            }
            inFlight += 1
            let records = self.records
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            Task(executorPreference: executor) {
                let answer = await records.answer(request)
                // The task runs on the connection's event loop (its executor), so the handler is at hand.
                let (handler, context) = bound.value
                handler.finished(answer, context: context)
            }
        }
    }

    private func finished(_ answer: Wire.Answer, context: ChannelHandlerContext) {
        inFlight -= 1
        guard active else { return }
        if quiescing, inFlight == 0, queued.isEmpty {
            sendThenClose(answer, context: context)
            return
        }
        send(answer, context: context)
        resume(context: context)
    }

    /// Starts what waits, and reads on if nothing does.
    private func resume(context: ChannelHandlerContext) {
        startQueued(context: context)
        if quiescing, inFlight == 0, queued.isEmpty {
            // Nothing runs: what was answered is written (its flush is due now), and the connection closes.
            active = false
            context.flush()
            context.close(promise: nil)
            return
        }
        if readHeld, queued.isEmpty, inFlight < Self.maxInFlight / 2, context.channel.isWritable {
            readHeld = false
            context.read()
        }
    }

    private func send(_ answer: Wire.Answer, context: ChannelHandlerContext) {
        var buffer = context.channel.allocator.buffer(capacity: 64)
        Wire.write(answer, to: &buffer)
        context.write(wrapOutboundOut(buffer), promise: nil)
        guard !flushScheduled else { return }
        flushScheduled = true
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.eventLoop.execute {
            let (handler, context) = bound.value
            handler.flushScheduled = false
            if handler.active { context.flush() }
        }
    }

    /// Answers the connection itself with `error` and closes it.
    private func refuse(_ error: APIError, context: ChannelHandlerContext) {
        logger.notice(
            "refused a wire connection", metadata: ["peer": "\(context.channel.remoteAddress.map { "\($0)" } ?? "?")", "why": "\(error.message)"])
        sendThenClose(Wire.Answer(id: Wire.connectionID, .failed(error)), context: context)
    }

    /// Writes `answer`, the connection's last, and closes the connection once it has gone to the socket (a close
    /// drops writes not yet taken).
    private func sendThenClose(_ answer: Wire.Answer, context: ChannelHandlerContext) {
        guard active else { return }
        active = false
        writeLastAnswer(answer, on: context.channel)
    }

    func read(context: ChannelHandlerContext) {
        if quiescing || !queued.isEmpty || inFlight >= Self.maxInFlight || !context.channel.isWritable {
            readHeld = true
            return
        }
        context.read()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { resume(context: context) }
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // A graceful stop, or the client done sending (the server allows half-closed connections): answer what was
        // read, then close.
        if event is Quiesce || (event as? ChannelEvent) == .inputClosed {
            quiescing = true
            resume(context: context)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        active = false
        queued.removeAll()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A frame too large (the stream cannot be read on) or a broken connection: say why if it can still be said.
        if let tooLarge = error as? WireFrameDecoder.TooLarge, active {
            refuse(APIError(status: 413, code: "too_large", message: tooLarge.description), context: context)
            return
        }
        active = false
        context.close(promise: nil)
    }
}
