import CircuitSecurity
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// The TLS identity a process's clients use unless told otherwise: a daemon sets its host certificate, the CLI the
/// certificate its flags name. nil: plaintext.
public enum ClientTLS {
    private static let box = NIOLockedValueBox<TLSFiles?>(nil)

    public static var `default`: TLSFiles? {
        get { box.withLockedValue { $0 } }
        set { box.withLockedValue { $0 = newValue } }
    }

    /// Puts a TLS client handler (mutual, the cluster's CA) at the front of `channel`'s pipeline.
    static func add(_ tls: TLSFiles?, to channel: any Channel) throws {
        guard let tls else { return }
        try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: tls.clientContext(), serverHostname: nil))
    }

    /// The same with a context of the caller's (a joining host's, which has no certificate yet), else `tls`.
    static func add(_ context: NIOSSLContext?, else tls: TLSFiles?, to channel: any Channel) throws {
        guard let context else { return try add(tls, to: channel) }
        try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: nil))
    }
}

/// Why an HTTP exchange failed before an answer arrived.
public enum HTTPExchangeError: Error, Sendable, Equatable, CustomStringConvertible {
    case connect(String)
    case timedOut(Duration)
    case closed
    /// A kept-alive connection was found closed before the request was written: nothing was sent.
    case stale

    /// The request never left: no connection, or a kept-alive one closed before it was written.
    public var requestNotSent: Bool {
        switch self {
        case .connect, .stale: return true
        case .timedOut, .closed: return false
        }
    }

    public var description: String {
        switch self {
        case .connect(let why): return why
        case .stale: return "the kept-alive connection was closed before the request was sent"
        case .timedOut(let d): return "no answer within \(d)"
        case .closed: return "the connection closed before the answer was complete"
        }
    }
}

/// One HTTP/1.1 request on a connection of its own (SwiftNIO), with a deadline: what the client library, the CLI
/// and a follower forwarding to its leader use. A connection per request on loopback or a LAN costs little and
/// shares nothing, so one slow or dead peer cannot hold up calls to the others.
public enum HTTPExchange {
    public struct Answer: Sendable {
        public var status: Int
        public var contentType: String?
        public var body: [UInt8]
        /// A redirect's target (`Location`).
        public var location: String? = nil
    }

    /// Sends `method uri` to `address` (`host:port`) and reads the whole answer. `sslContext`, if given, is the TLS
    /// client context instead of `tls`'s (a joining host's, before it has a certificate).
    public static func perform(
        _ method: HTTPMethod, _ uri: String, to address: String, body: [UInt8]? = nil,
        headers extra: [(String, String)] = [], timeout: Duration = .seconds(10), tls: TLSFiles? = ClientTLS.default,
        sslContext: NIOSSLContext? = nil
    ) async throws -> Answer {
        try await perform(
            method, uri, to: address, buffer: body.map { ByteBuffer(bytes: $0) }, headers: extra, timeout: timeout, tls: tls,
            sslContext: sslContext)
    }

    /// The same with the body as a buffer (sent as it is, not copied).
    public static func perform(
        _ method: HTTPMethod, _ uri: String, to address: String, buffer body: ByteBuffer?,
        headers extra: [(String, String)] = [], timeout: Duration = .seconds(10), tls: TLSFiles? = ClientTLS.default,
        sslContext: NIOSSLContext? = nil
    ) async throws -> Answer {
        try await perform(
            method, uri, to: address, parts: body.map { [$0] } ?? [], headers: extra, timeout: timeout, tls: tls,
            sslContext: sslContext)
    }

    /// The same with the body as the concatenation of `parts`, each sent as it is (not copied, nor gathered: the
    /// parts go out together in one vectored write).
    public static func perform(
        _ method: HTTPMethod, _ uri: String, to address: String, parts body: [ByteBuffer],
        headers extra: [(String, String)] = [], timeout: Duration = .seconds(10), tls: TLSFiles? = ClientTLS.default,
        sslContext: NIOSSLContext? = nil
    ) async throws -> Answer {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        let channel = try await connect(address, timeout: timeout, tls: tls, sslContext: sslContext)
        // The deadline, and a caller that gives up, close the connection: every wait on it ends at once. Cancelling a
        // task alone does not end a write suspended by back-pressure, or a read in flight (swift-nio #3472).
        let remaining = clock.now.duration(to: deadline)
        let timer = channel.channel.eventLoop.scheduleTask(
            in: TimeAmount(max(.zero, remaining))
        ) { channel.channel.close(promise: nil) }
        defer { timer.cancel() }
        do {
            return try await withTaskCancellationHandler {
                try await channel.executeThenClose { inbound, outbound in
                    let unsent = await sendKeepingFailure(method, uri, to: address, body: body, headers: extra, on: outbound)
                    do {
                        return try await readAnswer(inbound)
                    } catch {
                        throw unsent ?? error
                    }
                }
            } onCancel: {
                channel.channel.close(promise: nil)
            }
        } catch {
            if clock.now >= deadline { throw HTTPExchangeError.timedOut(timeout) }
            throw error
        }
    }

    /// One request on a connection of its own whose body is written, in chunked transfer coding, by `body` in a task
    /// of its own, while the answer is read. Back-pressure: each call of the `write` it is handed sends its parts and
    /// returns while less than `streamingWindow` bytes are still on their way to the socket (so up to that plus one
    /// call's parts); past that, it waits for the oldest to go out, so a server that reads no further holds the
    /// writer back. No deadline: a caller that gives up (its task cancelled) hangs up.
    ///
    /// An answer that comes before the body ends (a refusal, or an error midway) resets the connection and cancels
    /// `body`'s task, and that answer is returned once `body` has returned (a sequence that heeds cancellation, as
    /// AsyncStream does, ends at once; one that does not holds the call until its next element). An error `body`
    /// throws ends the body there, cleanly: the server answers for what it got, then the error is thrown.
    public static func performStreaming(
        _ method: HTTPMethod, _ uri: String, to address: String, tls: TLSFiles? = ClientTLS.default,
        body: @escaping @Sendable (_ write: ([ByteBuffer]) async throws -> Void) async throws -> Void
    ) async throws -> Answer {
        let channel = try await connect(address, timeout: .seconds(10), tls: tls)
        let connection = channel.channel
        let (answer, bodyError): (Answer, (any Error)?) = try await withTaskCancellationHandler {
            try await channel.executeThenClose { inbound, _ in
                try await withThrowingTaskGroup(of: (any Error)?.self) { group in
                    let ended = NIOLockedValueBox(false)
                    group.addTask {
                        var window = StreamingWindow(connection)
                        let headers = HTTPHeaders([("Host", address), ("Connection", "close"), ("Transfer-Encoding", "chunked")])
                        try await window.write([.head(HTTPRequestHead(version: .http1_1, method: method, uri: uri, headers: headers))], bytes: 0)
                        var failure: (any Error)? = nil
                        do {
                            try await body { parts in
                                try await window.write(
                                    parts.filter { $0.readableBytes > 0 }.map { .body(.byteBuffer($0)) }, bytes: parts.reduce(0) { $0 + $1.readableBytes })
                            }
                        } catch let error as StreamingWindow.WriteFailed {
                            throw error
                        } catch {
                            failure = error
                        }
                        // Cut short (the answer came first, or the caller gave up): the body must not end as if whole.
                        if Task.isCancelled { throw CancellationError() }
                        ended.withLockedValue { $0 = true }
                        try await window.write([.end(nil)], bytes: 0)
                        try await window.drain()
                        return failure
                    }
                    let answer: Answer
                    do {
                        answer = try await readAnswer(inbound)
                    } catch {
                        abort(connection)
                        group.cancelAll()
                        throw error
                    }
                    // A 200 after the whole body was written: what `body` threw, if anything, is the writing's result.
                    // Any other answer, or one before the body's end, cuts the writing short (reset first, so that
                    // the end of the body cannot reach the server after all).
                    if answer.status == 200, ended.withLockedValue({ $0 }), let result = try? await group.next() {
                        return (answer, result)
                    }
                    abort(connection)
                    group.cancelAll()
                    return (answer, nil)
                }
            }
        } onCancel: {
            abort(connection)
        }
        if let bodyError { throw bodyError }
        return answer
    }

    /// Hangs up at once: a reset rather than a FIN queued behind unread data, and over TLS without waiting for the
    /// peer's close_notify, which a server that reads no more cannot send (NIOSSL would wait 5 s for it).
    private static func abort(_ connection: any Channel) {
        let options = connection as? any SocketOptionProvider
        connection.eventLoop.execute {
            _ = options?.setSoLinger(linger(l_onoff: 1, l_linger: 0))
            // Closed from TLS's own place in the pipeline, the close goes to the socket without passing through it.
            if let tls = try? connection.pipeline.syncOperations.context(handlerType: NIOSSLClientHandler.self) {
                tls.close(promise: nil)
            } else {
                connection.close(promise: nil)
            }
        }
    }

    /// Bytes a streamed request's writer may have on their way to the socket before it waits.
    static let streamingWindow = 8 << 20

    /// The writes of a streamed request, straight to the channel, each with the future of its going out: the
    /// channel's writability alone (what NIOAsyncChannel's writer waits on) lets a fast producer queue writes without
    /// bound before it changes, and after a close, writes are dropped without an error.
    private struct StreamingWindow {
        struct WriteFailed: Error { let error: any Error }
        private let connection: any Channel
        private var unwritten = CircularBuffer<(written: EventLoopFuture<Void>, bytes: Int)>()
        private var unwrittenBytes = 0

        init(_ connection: any Channel) { self.connection = connection }

        /// Writes `parts` with one flush (the last one's future stands for them all: writes complete in order), then
        /// waits while more than the window is still unwritten.
        mutating func write(_ parts: [HTTPClientRequestPart], bytes: Int) async throws {
            guard let last = parts.last else { return }
            for part in parts.dropLast() { connection.write(part, promise: nil) }
            unwritten.append((connection.writeAndFlush(last), bytes))
            unwrittenBytes += bytes
            while unwrittenBytes > HTTPExchange.streamingWindow || unwritten.count > 1024 {
                try await waitForOldest()
            }
        }

        /// Waits until everything written went out.
        mutating func drain() async throws {
            while !unwritten.isEmpty { try await waitForOldest() }
        }

        private mutating func waitForOldest() async throws {
            guard let oldest = unwritten.first else { return }
            do {
                try await oldest.written.get()
            } catch {
                throw WriteFailed(error: error)
            }
            unwrittenBytes -= oldest.bytes
            unwritten.removeFirst()
        }
    }

    /// The whole answer on `inbound`: status, the headers kept, body.
    private static func readAnswer(_ inbound: NIOAsyncChannelInboundStream<HTTPClientResponsePart>) async throws -> Answer {
        var answer = Answer(status: 0, contentType: nil, body: [])
        for try await part in inbound {
            switch part {
            case .head(let head):
                answer.status = Int(head.status.code)
                answer.contentType = head.headers.first(name: "Content-Type")
                answer.location = head.headers.first(name: "Location")
            case .body(var buffer):
                answer.body += buffer.readBytes(length: buffer.readableBytes) ?? []
            case .end:
                return answer
            }
        }
        throw HTTPExchangeError.closed
    }

    /// Sends `GET uri` (or `method` with `body`) and calls `line` with each line of a streamed answer (a watch),
    /// until the answer ends, the caller's task is cancelled, or `line` throws. Returns the status and, for an error
    /// status, the whole body.
    public static func stream(
        _ uri: String, to address: String, method: HTTPMethod = .GET, body: [UInt8]? = nil,
        tls: TLSFiles? = ClientTLS.default, line: ([UInt8]) throws -> Void
    ) async throws -> (status: Int, errorBody: [UInt8]) {
        var pending: [UInt8] = []
        return try await streamChunks(method, uri, to: address, body: body, tls: tls) { chunk in
            pending += chunk
            while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let text = Array(pending[..<newline])
                pending.removeSubrange(...newline)
                if !text.isEmpty { try line(text) }
            }
        }
    }

    /// One request on a connection of its own; a 200 answer's body is handed over chunk by chunk as it comes (the
    /// next is read only after `chunk` returns: back-pressure). Any other answer's body is returned whole.
    public static func streamChunks(
        _ method: HTTPMethod, _ uri: String, to address: String, body: [UInt8]? = nil,
        tls: TLSFiles? = ClientTLS.default, chunk: ([UInt8]) async throws -> Void
    ) async throws -> (status: Int, errorBody: [UInt8]) {
        try await streamBuffers(method, uri, to: address, body: body, tls: tls) { buffer in
            try await chunk(Array(buffer: buffer))
        }
    }

    /// The same, each chunk as NIO read it (no copy). A 307 from a node that does not own the element asked for (its
    /// `Location` names the owning host's API) is followed once: nothing has been handed to `chunk` before it, and the
    /// request's body is sent again whole.
    public static func streamBuffers(
        _ method: HTTPMethod, _ uri: String, to address: String, body: [UInt8]? = nil,
        tls: TLSFiles? = ClientTLS.default, chunk: (ByteBuffer) async throws -> Void
    ) async throws -> (status: Int, errorBody: [UInt8]) {
        let answer = try await streamOnce(method, uri, to: address, body: body, tls: tls, chunk: chunk)
        if answer.status == 307, let owner = answer.location.flatMap(redirectAuthority) {
            let followed = try await streamOnce(method, uri, to: owner, body: body, tls: tls, chunk: chunk)
            return (followed.status, followed.errorBody)
        }
        return (answer.status, answer.errorBody)
    }

    /// `host:port` of a redirect's `http://host:port/...` target.
    static func redirectAuthority(_ url: String) -> String? {
        guard url.hasPrefix("http://") else { return nil }
        return String(url.dropFirst("http://".count).prefix { $0 != "/" })
    }

    private static func streamOnce(
        _ method: HTTPMethod, _ uri: String, to address: String, body: [UInt8]?, tls: TLSFiles?,
        chunk: (ByteBuffer) async throws -> Void
    ) async throws -> (status: Int, errorBody: [UInt8], location: String?) {
        let channel = try await connect(address, timeout: .seconds(10), tls: tls)
        // A caller that gives up closes the connection: cancelling the task alone may leave a read in flight
        // waiting for ever (swift-nio #3472).
        return try await withTaskCancellationHandler {
            try await channel.executeThenClose { inbound, outbound in
                let unsent = await sendKeepingFailure(
                    method, uri, to: address, body: body.map { [ByteBuffer(bytes: $0)] } ?? [], headers: [], on: outbound)
                var status = 0
                var errorBody: [UInt8] = []
                var location: String?
                do {
                    for try await part in inbound {
                        switch part {
                        case .head(let head):
                            status = Int(head.status.code)
                            location = head.headers.first(name: "Location")
                        case .body(let buffer):
                            if status == 200 { try await chunk(buffer) } else { errorBody += buffer.readableBytesView }
                        case .end:
                            return (status, errorBody, location)
                        }
                    }
                } catch {
                    throw unsent ?? error
                }
                if let unsent, status == 0 { throw unsent }
                return (status, errorBody, location)
            }
        } onCancel: {
            channel.channel.close(promise: nil)
        }
    }

    private static func connect(
        _ address: String, timeout: Duration, tls: TLSFiles?, sslContext: NIOSSLContext? = nil
    ) async throws -> NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart> {
        guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]) else {
            throw HTTPExchangeError.connect("\(address) is not host:port")
        }
        let host = String(address[..<colon])
        do {
            return try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connectTimeout(TimeAmount(timeout))
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                // A streamed answer (a channel's large messages, a process's output) in reads of up to 1 MiB.
                .channelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 2048, maximum: 1 << 20))
                .connect(host: host, port: port) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try ClientTLS.add(sslContext, else: tls, to: channel)
                        try channel.pipeline.syncOperations.addHTTPClientHandlers()
                        return try NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>(wrappingChannelSynchronously: channel)
                    }
                }
        } catch {
            throw HTTPExchangeError.connect("cannot connect to \(address): \(error)")
        }
    }

    /// Sends the request and answers why it could not, instead of throwing: a server may answer before it has read
    /// the whole body (a refusal) and close, or answer and close while the request's last part is still on its way
    /// here (the write then fails on a closed channel). Either way its answer, read next, is what the caller needs.
    private static func sendKeepingFailure(
        _ method: HTTPMethod, _ uri: String, to address: String, body: [ByteBuffer], headers extra: [(String, String)],
        on outbound: NIOAsyncChannelOutboundWriter<HTTPClientRequestPart>
    ) async -> (any Error)? {
        do {
            try await send(method, uri, to: address, body: body, headers: extra, on: outbound)
            return nil
        } catch {
            return error
        }
    }

    private static func send(
        _ method: HTTPMethod, _ uri: String, to address: String, body: [ByteBuffer], headers extra: [(String, String)],
        on outbound: NIOAsyncChannelOutboundWriter<HTTPClientRequestPart>
    ) async throws {
        var headers = HTTPHeaders([("Host", address), ("Connection", "close")])
        headers.add(name: "Content-Length", value: "\(body.reduce(0) { $0 + $1.readableBytes })")
        for (name, value) in extra { headers.add(name: name, value: value) }
        // One write of all the parts: NIO hands them to the socket together (writev), with one flush.
        var parts: [HTTPClientRequestPart] = [.head(HTTPRequestHead(version: .http1_1, method: method, uri: uri, headers: headers))]
        parts.reserveCapacity(body.count + 2)
        for part in body where part.readableBytes > 0 { parts.append(.body(.byteBuffer(part))) }
        parts.append(.end(nil))
        try await outbound.write(contentsOf: parts)
    }
}
