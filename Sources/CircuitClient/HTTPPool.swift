import CircuitSecurity
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// Keep-alive HTTP/1.1 connections to one address (SwiftNIO), one request at a time on each: a follower forwarding to
/// its leader, and clients that make many calls, reuse connections instead of opening one per request.
///
/// A request is only ever sent on a connection that is open when it is taken. A kept-alive connection found closed
/// before the request was written (the server closed it meanwhile) is dropped and the request goes on a new one:
/// nothing was sent. If the connection closes after the request was written, the request fails (it is not sent
/// again, since it may have been applied).
public final class HTTPPool: Sendable {
    public let address: String
    /// Mutual TLS with this identity; nil: plaintext.
    public let tls: TLSFiles?
    private let maxIdle: Int
    private let idle = NIOLockedValueBox<[PooledConnection]>([])

    public init(address: String, tls: TLSFiles? = ClientTLS.default, maxIdle: Int = 64) {
        self.address = address
        self.tls = tls
        self.maxIdle = maxIdle
    }

    private struct Key: Hashable {
        var address: String
        var identity: ObjectIdentifier?
    }

    private static let pools = NIOLockedValueBox<[Key: HTTPPool]>([:])

    /// The process-wide pool for `address`, with the identity `tls`.
    public static func shared(_ address: String, tls: TLSFiles? = ClientTLS.default) -> HTTPPool {
        let key = Key(address: address, identity: tls.map(ObjectIdentifier.init))
        return pools.withLockedValue { pools in
            if let pool = pools[key] { return pool }
            let pool = HTTPPool(address: address, tls: tls)
            pools[key] = pool
            return pool
        }
    }

    public func perform(
        _ method: HTTPMethod, _ uri: String, body: [UInt8]? = nil, headers extra: [(String, String)] = [],
        timeout: Duration = .seconds(10)
    ) async throws -> HTTPExchange.Answer {
        try await perform(method, uri, buffer: body.map { ByteBuffer(bytes: $0) }, headers: extra, timeout: timeout)
    }

    /// The same with the body as a buffer (sent as it is, not copied).
    public func perform(
        _ method: HTTPMethod, _ uri: String, buffer body: ByteBuffer?, headers extra: [(String, String)] = [],
        timeout: Duration = .seconds(10)
    ) async throws -> HTTPExchange.Answer {
        var connection: PooledConnection?
        while connection == nil, let candidate = idle.withLockedValue({ $0.popLast() }) {
            if candidate.channel.isActive { connection = candidate } else { candidate.channel.close(promise: nil) }
        }
        var conn: PooledConnection
        if let connection { conn = connection } else { conn = try await connect(timeout: timeout) }
        do {
            let sent: (HTTPExchange.Answer, Bool)
            do {
                sent = try await conn.send(method, uri, host: address, body: body, headers: extra, timeout: timeout)
            } catch HTTPExchangeError.stale where connection != nil {
                conn.channel.close(promise: nil)
                conn = try await connect(timeout: timeout)
                sent = try await conn.send(method, uri, host: address, body: body, headers: extra, timeout: timeout)
            }
            let (answer, keepAlive) = sent
            if keepAlive && conn.channel.isActive {
                let kept = idle.withLockedValue { idle -> Bool in
                    guard idle.count < maxIdle else { return false }
                    idle.append(conn)
                    return true
                }
                if !kept { conn.channel.close(promise: nil) }
            } else {
                conn.channel.close(promise: nil)
            }
            return answer
        } catch {
            conn.channel.close(promise: nil)
            throw error
        }
    }

    private func connect(timeout: Duration) async throws -> PooledConnection {
        guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]) else {
            throw HTTPExchangeError.connect("\(address) is not host:port")
        }
        let host = String(address[..<colon])
        let tls = self.tls
        do {
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connectTimeout(TimeAmount(timeout))
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try ClientTLS.add(tls, to: channel)
                        try channel.pipeline.syncOperations.addHTTPClientHandlers()
                        try channel.pipeline.syncOperations.addHandler(ResponseCollector())
                    }
                }
                .connect(host: host, port: port).get()
            return PooledConnection(channel: channel)
        } catch {
            throw HTTPExchangeError.connect("cannot connect to \(address): \(error)")
        }
    }
}

/// One pooled connection.
struct PooledConnection: Sendable {
    let channel: any Channel

    /// Sends one request and waits for its whole answer; also says whether the connection may be reused.
    func send(
        _ method: HTTPMethod, _ uri: String, host: String, body: ByteBuffer?, headers extra: [(String, String)],
        timeout: Duration
    ) async throws -> (HTTPExchange.Answer, Bool) {
        let promise = channel.eventLoop.makePromise(of: (HTTPExchange.Answer, Bool).self)
        let result = channel.eventLoop.makePromise(of: EventLoopFuture<(HTTPExchange.Answer, Bool)>.self)
        var headers = HTTPHeaders([("Host", host)])
        headers.add(name: "Content-Length", value: "\(body?.readableBytes ?? 0)")
        for (name, value) in extra { headers.add(name: name, value: value) }
        let head = HTTPRequestHead(version: .http1_1, method: method, uri: uri, headers: headers)
        let channel = self.channel
        channel.eventLoop.execute {
            // Closed since it was taken: nothing is written, the caller may use another connection.
            guard channel.isActive, let collector = try? channel.pipeline.syncOperations.handler(type: ResponseCollector.self) else {
                promise.fail(HTTPExchangeError.stale)
                result.fail(HTTPExchangeError.stale)
                return
            }
            collector.start(promise)
            channel.write(HTTPClientRequestPart.head(head), promise: nil)
            if let body, body.readableBytes > 0 {
                channel.write(HTTPClientRequestPart.body(.byteBuffer(body)), promise: nil)
            }
            let written = channel.eventLoop.makePromise(of: Void.self)
            let whole = NIOLoopBoundBox(false, eventLoop: channel.eventLoop)
            written.futureResult.whenSuccess { whole.value = true }
            channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: written)
            let timer = channel.eventLoop.scheduleTask(in: TimeAmount(timeout)) {
                promise.fail(HTTPExchangeError.timedOut(timeout))
                channel.close(promise: nil)
            }
            promise.futureResult.whenComplete { _ in timer.cancel() }
            // An answer that came before the whole request was written (a server refusing a body too large reads no
            // further, then closes): the connection is not reused.
            let answered = promise.futureResult.map { answer, keepAlive in (answer, keepAlive && whole.value) }
            answered.whenComplete { _ in written.futureResult.whenFailure { _ in channel.close(promise: nil) } }
            result.succeed(answered)
        }
        // A caller that gives up (its task is cancelled) hangs up: the server sees the connection close and withdraws
        // a waiting operation. Only while the answer has not come (decided on the event loop, where the answer is
        // taken): a connection whose exchange is over may be back in the pool, in use by another request.
        let answering = NIOLockedValueBox(true)
        promise.futureResult.whenComplete { _ in answering.withLockedValue { $0 = false } }
        return try await withTaskCancellationHandler {
            try await result.futureResult.flatMap { $0 }.get()
        } onCancel: {
            channel.eventLoop.execute {
                if answering.withLockedValue({ $0 }) { channel.close(promise: nil) }
            }
        }
    }
}

/// Collects one answer at a time; fails it if the connection closes first.
final class ResponseCollector: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPClientResponsePart

    private var promise: EventLoopPromise<(HTTPExchange.Answer, Bool)>?
    private var answer = HTTPExchange.Answer(status: 0, contentType: nil, body: [])
    private var keepAlive = true

    func start(_ promise: EventLoopPromise<(HTTPExchange.Answer, Bool)>) {
        self.promise = promise
        answer = HTTPExchange.Answer(status: 0, contentType: nil, body: [])
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            answer.status = Int(head.status.code)
            answer.contentType = head.headers.first(name: "Content-Type")
            answer.location = head.headers.first(name: "Location")
            keepAlive = head.isKeepAlive
        case .body(var buffer):
            answer.body += buffer.readBytes(length: buffer.readableBytes) ?? []
        case .end:
            let p = promise
            promise = nil
            p?.succeed((answer, keepAlive))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        let p = promise
        promise = nil
        p?.fail(HTTPExchangeError.closed)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        let p = promise
        promise = nil
        p?.fail(error)
        context.close(promise: nil)
    }
}
