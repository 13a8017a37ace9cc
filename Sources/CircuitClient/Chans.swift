import CircuitAPI
import CircuitSecurity
import Foundation
import NIOCore

extension CircuitClient {
    /// Creates a channel element at `path` (under `/X<host>`) holding up to `capacity` messages (0: every send waits
    /// for its receiver). Its buffer lives on that host.
    @discardableResult
    public func makeChannel(_ path: String, capacity: UInt32) async throws(CircuitClientError) -> WriteView {
        var view = ElementView(kind: "chan")
        view.capacity = capacity
        return try await create(path, view)
    }

    /// Creates a membership subscription at `path` (under `/X<host>`): `join` gets every live host, then each host that
    /// joins; `leave` gets each host that leaves or expires from now on. Each event is a host's path (`/X...`), read
    /// with `channel(path).receive()`.
    @discardableResult
    public func makeSubscription(_ path: String, events: String) async throws(CircuitClientError) -> WriteView {
        var view = ElementView(kind: "subscription")
        view.events = events
        return try await create(path, view)
    }

    /// The channel at `path`, reached at its owning host's API directly (found in the membership). Its create
    /// revision is read first (linearizably), so that every operation through the handle reaches that channel and
    /// no other: a channel removed and made again at the same path meanwhile answers `gone`.
    public func channel(_ path: String) async throws(CircuitClientError) -> Chan {
        var chan = Chan(path: Self.rooted(path), through: try await owner(of: path))
        chan.ownerServes = true
        // Not known (no element there yet, or not readable now): the host takes on whatever is at the path.
        chan.createRevision = try? await peek(path).createRevision
        return chan
    }

    /// A client of the API of the host that owns `path` (`/X<host>/...`), found in the membership.
    public func owner(of path: String) async throws(CircuitClientError) -> CircuitClient {
        let rooted = Self.rooted(path)
        guard let host = rooted.split(separator: "/", maxSplits: 1).first.map(String.init), host.first == "X" else {
            let job = rooted.hasPrefix("/jobs/") ? " (a job's process is at /X<host>\(rooted), its host named in the job's element)" : ""
            throw .api(.badRequest("\(path) is not under a host (/X<host id>/...)\(job): channels and processes live on the host that owns them"))
        }
        guard let owner = try await members(stale: true).first(where: { $0.id == host && $0.state == "alive" }) else {
            throw .api(APIError(status: 409, code: "host_not_alive", message: "host \(host), which owns \(rooted), is not alive"))
        }
        var client = CircuitClient(endpoints: [owner.clientAddress], tls: tls)
        client.timeout = timeout
        return client
    }
}

/// A channel, spoken to at its owning host. Go's semantics: FIFO; capacity 0 is a rendezvous; a closed channel
/// still delivers what it holds, then `receive` fails with code `closed`; sending on a closed channel fails with code
/// `closed`; `trySend` and `tryReceive` fail with code `would_block` instead of waiting.
public struct Chan: Sendable {
    public let path: String
    /// The owning host's API, or any node's: another node answers each call by naming the owning host (307), where
    /// the library asks it.
    public var owner: CircuitClient {
        didSet { if owner.endpoints != oldValue.endpoints { ownerServes = false } }
    }
    /// Whether `owner` is known to be the owning host's API (found in the membership): a streamed send then need not
    /// ask it where the channel is served.
    var ownerServes = false
    /// The create revision of the channel meant, if known: the owning host then serves that channel only, even if
    /// its watch has not yet told it that the path's channel was removed and made again (the older one is dropped
    /// there and then), and answers `gone` once that channel was removed.
    public var createRevision: UInt64?

    /// The query every operation carries: the channel meant, if known, and `extra`.
    private func query(_ extra: [String: String] = [:]) -> [String: String] {
        var q = extra
        if let createRevision { q["created"] = String(createRevision) }
        return q
    }

    /// The channel at `path`, reached through `node`: the owning host's API, or any node's, which names the owner
    /// (307) for each operation, and the library asks the owner (one round trip more).
    public init(path: String, through node: CircuitClient) {
        self.path = CircuitClient.rooted(path)
        self.owner = node
    }

    /// Sends one message; returns once it is buffered or, at capacity 0, received. Waits as long as the client's
    /// `timeout`.
    ///
    /// First as a try-send on a kept-alive connection; only if that would block, as a waiting send on a connection of
    /// its own (a waiting request's connection is closed after its answer). The same thing happens either way: a
    /// try-send that succeeds is a send that did not have to wait.
    @discardableResult
    public func send(_ message: [UInt8]) async throws(CircuitClientError) -> ChanStatView {
        try await Self.tryFirst { () async throws(CircuitClientError) in try await trySend(message) } then: {
            () async throws(CircuitClientError) in
            try await owner.call("POST", "/v1/chan/send" + path, query: query(), bytes: message, ownConnection: true)
        }
    }

    @discardableResult
    public func trySend(_ message: [UInt8]) async throws(CircuitClientError) -> ChanStatView {
        try await owner.call("POST", "/v1/chan/send" + path, query: query(["try": "1"]), bytes: message)
    }

    /// Receives the next message; waits for one as long as the client's `timeout`. As `send`: a try first, then a
    /// wait on a connection of its own.
    public func receive() async throws(CircuitClientError) -> [UInt8] {
        try await Self.tryFirst { () async throws(CircuitClientError) in try await tryReceive() } then: {
            () async throws(CircuitClientError) in
            try await owner.callRaw("POST", "/v1/chan/recv" + path, query: query(), ownConnection: true)
        }
    }

    /// `attempt` (a try-operation); only if it would block, `wait` (the waiting one, on a connection of its own).
    private static func tryFirst<T>(
        _ attempt: () async throws(CircuitClientError) -> T, then wait: () async throws(CircuitClientError) -> T
    ) async throws(CircuitClientError) -> T {
        do {
            return try await attempt()
        } catch {
            guard case .api(let e) = error, e.code == "would_block" else { throw error }
        }
        return try await wait()
    }

    public func tryReceive() async throws(CircuitClientError) -> [UInt8] {
        try await owner.callRaw("POST", "/v1/chan/recv" + path, query: query(["try": "1"]))
    }

    @discardableResult
    public func close() async throws(CircuitClientError) -> ChanStatView {
        try await owner.call("POST", "/v1/chan/close" + path, query: query())
    }

    public func stat() async throws(CircuitClientError) -> ChanStatView {
        try await owner.call("GET", "/v1/chan/stat" + path, query: query())
    }
}

extension CircuitClient {
    /// Creates a select at `path` (under `/X<host>`) with these clauses (docs/selects.md).
    @discardableResult
    public func makeSelect(_ path: String, clauses: [SelectClauseView]) async throws(CircuitClientError) -> WriteView {
        let text: String
        do { text = String(decoding: try JSONEncoder().encode(clauses), as: UTF8.self) } catch { throw .badAnswer("\(error)") }
        var view = ElementView(kind: "select")
        view.clauses = text
        return try await create(path, view)
    }

    /// Waits, at the select's host, until exactly one of its clauses fires; answers which and what it brought.
    public func select(_ path: String) async throws(CircuitClientError) -> SelectOutcomeView {
        try await owner(of: path).call("POST", "/v1/select/wait" + Self.rooted(path), ownConnection: true)
    }
}

extension Chan {
    /// Sends every message, in order, in one request: the host sends each after the last was taken, so the sender
    /// does not wait a round trip per message. Answers how many were sent (all, unless it throws).
    @discardableResult
    public func send(contentsOf messages: [[UInt8]]) async throws(CircuitClientError) -> Int {
        // Each message is copied once, into the body as it goes out.
        var body = ByteBufferAllocator().buffer(capacity: messages.reduce(0) { $0 + 4 + $1.count })
        for m in messages {
            body.writeInteger(UInt32(m.count))
            body.writeBytes(m)
        }
        return try await sendStream([body])
    }

    /// The same from buffers: a large message (64 KiB or more) goes out as it is, not copied into the request; small
    /// ones are gathered with the framing around them.
    @discardableResult
    public func send(contentsOf messages: [ByteBuffer]) async throws(CircuitClientError) -> Int {
        var writer = MessageFrameWriter()
        for m in messages { writer.append(m) }
        return try await sendStream(writer.take())
    }

    /// Sends each message of `messages`, in order, in one request that lasts as long as the sequence: a stream of
    /// sends, as `send(contentsOf:)`, for a producer whose messages are not all there up front (a pipe, a generator).
    /// Nothing waits a round trip between messages. Back-pressure reaches the producer: the next message is taken
    /// from the sequence while less than 8 MiB (`HTTPExchange.streamingWindow`) of those before it are still on their
    /// way to the socket, and the host reads no further while a send waits on a full channel. Each message is written
    /// as it comes, framed as `send(contentsOf:)` frames it (a large one as it is, not copied). Answers how many were
    /// sent: all, unless it throws.
    ///
    /// A refusal midway (the channel closed or removed, a message too large) ends the stream with that error, as a
    /// `CircuitClientError`, even while the sequence has nothing to send: its task is cancelled (a sequence that heeds
    /// cancellation, as AsyncStream does, ends then; one that does not holds the call until its next element). An
    /// error the sequence throws ends the request cleanly and is thrown as it is, once the host answered: every
    /// message before it was sent.
    @discardableResult
    public func send<Messages: AsyncSequence & Sendable>(streaming messages: Messages) async throws -> Int
    where Messages.Element == ByteBuffer {
        let endpoint = try await servingEndpoint()
        let created = createRevision.map { "&created=\($0)" } ?? ""
        let answer = try await CircuitClient.streamedRequest(
            "/v1/chan/send\(CircuitClient.escape(path: path))?stream=1\(created)", to: endpoint, tls: owner.tls, messages
        ) { message in
            var frames = MessageFrameWriter()
            frames.append(message)
            return frames.take()
        }
        if answer.status != 200 { throw CircuitClient.apiError(status: answer.status, body: answer.body) }
        do {
            return try JSONDecoder().decode([String: Int].self, from: Data(answer.body))["sent"] ?? 0
        } catch {
            throw CircuitClientError.badAnswer("\(error)")
        }
    }

    /// A stream of sends whose body is `parts` (framed messages), on a connection of its own.
    private func sendStream(_ parts: [ByteBuffer]) async throws(CircuitClientError) -> Int {
        let answer = try await owner.callRaw(
            "POST", "/v1/chan/send" + path, query: query(["stream": "1"]), parts: parts, ownConnection: true)
        do {
            return try JSONDecoder().decode([String: Int].self, from: Data(answer))["sent"] ?? 0
        } catch {
            throw .badAnswer("\(error)")
        }
    }

    /// Receives up to `count` messages in one request, each handed to `each` as it comes; fewer if the channel is
    /// closed and empty first. Answers how many. Throws if the channel is removed (or its host leaves) meanwhile,
    /// after handing over what came before.
    @discardableResult
    public func receive(upTo count: Int, each: ([UInt8]) async throws -> Void) async throws(CircuitClientError) -> Int {
        // Each message's bytes are copied once, from the buffers NIO read into the array handed over.
        try await receive(upTo: count) { (pieces: [ByteBuffer]) in
            var message: [UInt8] = []
            message.reserveCapacity(pieces.reduce(0) { $0 + $1.readableBytes })
            for piece in pieces { piece.withUnsafeReadableBytes { message.append(contentsOf: $0) } }
            try await each(message)
        }
    }

    /// The same, each message handed over as the buffers it was read in, in order (one, unless it arrived over
    /// several reads of the socket), without a copy: their concatenation is the message.
    @discardableResult
    public func receive(upTo count: Int, pieces each: ([ByteBuffer]) async throws -> Void) async throws(CircuitClientError) -> Int {
        // Through a node that does not own the channel: its 307 is followed (nothing is received before it).
        guard let endpoint = owner.endpoints.first else { throw .unreachable(endpoints: [], why: "no endpoints given") }
        var frames = MessageFrameReader(failures: true)
        var received = 0
        let answer: (status: Int, errorBody: [UInt8])
        do {
            let created = createRevision.map { "&created=\($0)" } ?? ""
            answer = try await HTTPExchange.streamBuffers(.POST, "/v1/chan/recv\(CircuitClient.escape(path: path))?stream=\(count)\(created)", to: endpoint, tls: owner.tls) { chunk in
                var chunk = chunk
                while let message = try frames.next(&chunk) {
                    try await each(message)
                    received += 1
                }
            }
        } catch let failed as MessageFrameReader.Failed {
            guard let failure = try? JSONDecoder().decode(StreamFailure.self, from: Data(failed.failure.readableBytesView)) else {
                throw .badAnswer("the stream of receives failed, and its failure is not JSON: \(String(buffer: failed.failure))")
            }
            throw .api(failure.apiError)
        } catch {
            throw .unreachable(endpoints: [endpoint], why: "\(error)")
        }
        if answer.status != 200 { throw CircuitClient.apiError(status: answer.status, body: answer.errorBody) }
        return received
    }
}

extension Chan {
    /// The API that serves this channel's streamed sends: `owner`'s, or the owning host's that it names (307) if
    /// `owner` is another node. Asked with a `stat` first (unless `owner` was found in the membership), because a
    /// streamed send cannot follow a redirect: its messages, once taken from their sequence, cannot be taken again.
    /// If the `stat` fails, the streamed call goes to `owner` and reports what is wrong there.
    func servingEndpoint() async throws(CircuitClientError) -> String {
        guard let endpoint = owner.endpoints.first else { throw .unreachable(endpoints: [], why: "no endpoints given") }
        if ownerServes { return endpoint }
        let uri = "/v1/chan/stat\(CircuitClient.escape(path: path))" + (createRevision.map { "?created=\($0)" } ?? "")
        // Short: a node that does not answer a stat at once is not worth waiting for; the streamed call goes there
        // and says what is wrong.
        let timeout = Duration.milliseconds(Int64(min(owner.timeout, 5) * 1000))
        guard let answer = try? await HTTPPool.shared(endpoint, tls: owner.tls).perform(.GET, uri, buffer: nil, timeout: timeout),
            answer.status == 307, let target = answer.location.flatMap(CircuitClient.authority)
        else { return endpoint }
        return target
    }
}

/// An error the sequence of a streamed request threw, told apart from the connection's.
private struct StreamedMessagesFailed: Error {
    let error: any Error
}

extension CircuitClient {
    /// A POST to `uri` whose body is the sequence's elements, each written as its `parts` as it comes
    /// (`HTTPExchange.performStreaming`: back-pressure, a refusal midway ends it). Errors: the sequence's own as it
    /// threw it; a request never sent `unreachable`; any other failure `noAnswer`. The answer is the host's, any status.
    static func streamedRequest<Elements: AsyncSequence & Sendable>(
        _ uri: String, to endpoint: String, tls: TLSFiles?, _ elements: Elements,
        parts: @escaping @Sendable (Elements.Element) -> [ByteBuffer]
    ) async throws -> HTTPExchange.Answer {
        do {
            return try await HTTPExchange.performStreaming(.POST, uri, to: endpoint, tls: tls) { write in
                var iterator = elements.makeAsyncIterator()
                while true {
                    let next: Elements.Element?
                    do {
                        next = try await iterator.next()
                    } catch {
                        throw StreamedMessagesFailed(error: error)
                    }
                    guard let element = next else { return }
                    try await write(parts(element))
                }
            }
        } catch let produced as StreamedMessagesFailed {
            throw produced.error
        } catch let error as HTTPExchangeError where error.requestNotSent {
            throw CircuitClientError.unreachable(endpoints: [endpoint], why: "\(error)")
        } catch {
            throw CircuitClientError.noAnswer(endpoint: endpoint, why: Task.isCancelled ? "cancelled" : "\(error)")
        }
    }
}

extension SelectClauseView {
    /// A clause that receives from `chan`: the channel the handle names (with its create revision, if it knows it)
    /// and no other made at its path later.
    public static func receive(from chan: Chan) -> SelectClauseView {
        SelectClauseView(op: "recv", chan: chan.path, created: chan.createRevision)
    }

    /// A clause that sends `message` (exactly these bytes) to `chan`, as `receive(from:)` names it.
    public static func send(_ message: [UInt8], to chan: Chan) -> SelectClauseView {
        SelectClauseView(op: "send", chan: chan.path, created: chan.createRevision, messageBase64: Data(message).base64EncodedString())
    }
}
