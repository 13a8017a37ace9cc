import CircuitClient
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix

/// One coordination service under the side-by-side benchmark's load (`circuit bench compare`): three members on
/// loopback, started and stopped by the benchmark, each durable as shipped (fsync on). Circuit, etcd and ZooKeeper
/// each implement it; the load generator is the same code for all three.
protocol ComparedSystem: AnyObject, Sendable {
    /// "Circuit", "etcd", "ZooKeeper".
    var name: String { get }
    /// The version of the software measured, for the table's heading (e.g. "etcd 3.4.23").
    var version: String { get }
    /// Starts the three members in fresh data folders under the system's base folder and returns once a write
    /// through every member succeeds.
    func start() async throws
    /// Kills every member (SIGKILL) and waits for them; idempotent; removes nothing.
    func stop()
    /// A new connection to member `member` (0, 1 or 2) for one closed-loop client: used by one task at a time.
    func connect(_ member: Int) async throws -> any ComparedConnection
    /// The member that leads now (asked of the members; throws if none answers within a few seconds).
    func leader() async throws -> Int
    /// SIGKILL of one member (it stays down until `restart`).
    func kill9(_ member: Int)
    /// Starts a killed member again on its data folder and returns once it serves.
    func restart(_ member: Int) async throws
    /// The member's resident set size in bytes (VmRSS of its process), 0 if it is not running.
    func residentBytes(_ member: Int) -> Int
    /// Bytes its data folder takes on disk (allocated blocks, `du` style).
    func diskBytes(_ member: Int) -> Int
}

/// One client's connection to one member. Keys are 16 bytes (`/bench/k00000042` style, each system maps it to its
/// own namespace); values are bytes. Every call throws `ComparedError` or a transport error on failure.
protocol ComparedConnection: AnyObject, Sendable {
    /// Creates the key, or overwrites it if it exists.
    func put(_ key: String, _ value: [UInt8]) async throws
    /// A linearizable read (etcd: a default range; ZooKeeper: sync then getData; Circuit: a default GET). Returns the
    /// key's version (a per-key counter that every write increments: etcd's `version`, ZooKeeper's `Stat.version`
    /// plus one, Circuit's `version`), 0 if it does not exist.
    func read(_ key: String) async throws -> Int64
    /// Writes `value` only if the key is at `version` (as `read` counts it); returns the new version, or nil if the
    /// key was at another version.
    func compareAndSet(_ key: String, version: Int64, _ value: [UInt8]) async throws -> Int64?
    /// Starts watching `key` on this connection; `changed` is called once per change seen (each write, from the
    /// moment `watch` returns). ZooKeeper's one-shot watches are re-armed by the implementation.
    func watch(_ key: String, changed: @escaping @Sendable () -> Void) async throws
    /// Closes the connection.
    func close() async
    /// The executor of the event loop the connection's calls are written and answered on: the load generator's
    /// clients run on it, so a call costs the generator no thread hop (the same for every system).
    var taskExecutor: any TaskExecutor { get }
}

/// A failure of a compared system that is not a transport error.
struct ComparedError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// One keep-alive HTTP/1.1 connection (SwiftNIO) for one request at a time: the load generator's client for the
/// systems that speak HTTP (Circuit's API, etcd's JSON gateway). Sendable: its only state is the channel; the
/// pipeline's handler owns the rest.
final class BenchHTTPConnection: Sendable {
    private let channel: any Channel
    /// `host:port`: the Host header.
    let address: String

    /// No answer within this: the request fails and the connection is closed (etcd itself gives up after ~7 s
    /// without a quorum and answers 503).
    private static let requestTimeout: TimeAmount = .seconds(10)

    /// The executor of the connection's event loop (`ComparedConnection.taskExecutor`).
    let taskExecutor: EventLoopTaskExecutor

    private init(channel: any Channel, address: String) {
        self.channel = channel
        self.address = address
        self.taskExecutor = EventLoopTaskExecutor(channel.eventLoop)
    }

    static func open(host: String, port: Int) async throws -> BenchHTTPConnection {
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connectTimeout(.seconds(5))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(BenchHTTPHandler())
                }
            }
            .connect(host: host, port: port).get()
        return BenchHTTPConnection(channel: channel, address: "\(host):\(port)")
    }

    func close() async {
        try? await channel.close().get()
    }

    /// One request; its status and body.
    func request(_ method: HTTPMethod, _ uri: String, body: ByteBuffer?) async throws -> (status: Int, body: ByteBuffer) {
        let channel = self.channel
        let answer = channel.eventLoop.makePromise(of: BenchHTTPAnswer.self)
        var headers = HTTPHeaders()
        headers.add(name: "Host", value: address)
        headers.add(name: "Content-Length", value: String(body?.readableBytes ?? 0))
        let head = HTTPRequestHead(version: .http1_1, method: method, uri: uri, headers: headers)
        let timer = channel.eventLoop.scheduleTask(in: Self.requestTimeout) {
            answer.fail(ComparedError("\(method) \(uri): no answer within 10 s"))
            channel.close(promise: nil)
        }
        answer.futureResult.whenComplete { _ in timer.cancel() }
        // A write that fails (the connection closed meanwhile) fails the answer too: nothing else would.
        channel.writeAndFlush(BenchHTTPExchange(head: head, body: body, answer: answer)).whenFailure { answer.fail($0) }
        // A caller that gives up hangs up, which fails the answer.
        let result = try await withTaskCancellationHandler {
            try await answer.futureResult.get()
        } onCancel: {
            channel.close(promise: nil)
        }
        return (result.status, result.body)
    }
}

/// One request as written into the pipeline, with the promise its answer completes.
private struct BenchHTTPExchange: Sendable {
    let head: HTTPRequestHead
    let body: ByteBuffer?
    let answer: EventLoopPromise<BenchHTTPAnswer>
}

private struct BenchHTTPAnswer: Sendable {
    let status: Int
    let body: ByteBuffer
}

/// Turns a `BenchHTTPExchange` into the request's parts and completes its promise with the answer (answers come in
/// request order on HTTP/1.1); fails whatever is waiting if the connection closes.
private final class BenchHTTPHandler: ChannelDuplexHandler {
    typealias InboundIn = HTTPClientResponsePart
    typealias OutboundIn = BenchHTTPExchange
    typealias OutboundOut = HTTPClientRequestPart

    private var waiting = CircularBuffer<EventLoopPromise<BenchHTTPAnswer>>()
    private var status = 0
    private var body = ByteBuffer()

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let exchange = unwrapOutboundIn(data)
        waiting.append(exchange.answer)
        context.write(wrapOutboundOut(.head(exchange.head)), promise: nil)
        if let body = exchange.body { context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil) }
        context.write(wrapOutboundOut(.end(nil)), promise: promise)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            status = Int(head.status.code)
            body.clear()
        case .body(var part):
            body.writeBuffer(&part)
        case .end:
            let answer = BenchHTTPAnswer(status: status, body: body)
            // A new buffer: the answer keeps the old one, clearing it would copy.
            body = ByteBuffer()
            waiting.popFirst()?.succeed(answer)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        failAll(ComparedError("the server closed the connection"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        failAll(error)
        context.close(promise: nil)
    }

    private func failAll(_ error: any Error) {
        while let promise = waiting.popFirst() { promise.fail(error) }
    }
}
