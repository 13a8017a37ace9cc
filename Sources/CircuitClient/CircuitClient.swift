import CircuitAPI
import CircuitSecurity
import Foundation
import NIOCore
import NIOHTTP1

/// Why a call to the cluster failed.
public enum CircuitClientError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The cluster answered with an error.
    case api(APIError)
    /// No endpoint could be reached, or none answered a read. A write that fails so was sent to none of them: it did
    /// not happen. (A stream that breaks midway, a watch or a receive, fails so too.)
    case unreachable(endpoints: [String], why: String)
    /// A write was sent to `endpoint` and no answer came (a timeout, a connection lost): it may or may not have
    /// taken effect. It is not sent again to another endpoint, which could apply it twice.
    case noAnswer(endpoint: String, why: String)
    /// The answer was not what the API documents.
    case badAnswer(String)

    public var description: String {
        switch self {
        case .api(let e): return e.message
        case .unreachable(let endpoints, let why):
            return "cannot reach the cluster at \(endpoints.joined(separator: ", ")): \(why)"
        case .noAnswer(let endpoint, let why):
            return "no answer from \(endpoint), so the request may or may not have taken effect: \(why)"
        case .badAnswer(let why): return "unexpected answer from the cluster: \(why)"
        }
    }
}

/// Async calls to a Circuit cluster's HTTP/JSON API (docs/http-api.md). Any node answers: writes and linearizable
/// reads sent to a follower are forwarded to the leader. If a node cannot be reached, the next endpoint is tried.
public struct CircuitClient: Sendable {
    public let endpoints: [String]
    /// Seconds to wait for each answer.
    public var timeout: Double = 10
    /// Mutual TLS with this identity (its certificate's roles decide what the cluster lets it do); nil: plaintext.
    public var tls: TLSFiles?

    /// `endpoints`: `host:port` of one or more nodes' APIs; `tls`: the identity to connect with (default: the
    /// process's, `ClientTLS.default`).
    public init(endpoints: [String], tls: TLSFiles? = ClientTLS.default) {
        self.endpoints = endpoints
        self.tls = tls
    }

    // MARK: - The cluster

    public func status() async throws(CircuitClientError) -> StatusView { try await call("GET", "/v1/status") }

    /// Facts about the host this client speaks to (its CPUs, memory, load) and its daemon.
    public func sys() async throws(CircuitClientError) -> SysView { try await call("GET", "/v1/sys") }

    /// Tests only (a daemon started with `--test-faults`): this node drops its Raft traffic to the hosts `to` and from
    /// the hosts `from`; empty sets heal.
    public func cut(to: [String], from: [String]) async throws(CircuitClientError) {
        let body: Data
        do { body = try JSONEncoder().encode(["to": to, "from": from]) } catch { throw .badAnswer("\(error)") }
        let _: [String: Bool] = try await call("PUT", "/v1/debug/cut", body: body)
    }

    /// The bytes of the replicated state this node has applied (its snapshot, which holds the applied index).
    public func stateSnapshot() async throws(CircuitClientError) -> [UInt8] { try await callRaw("GET", "/v1/debug/state") }

    public func members(stale: Bool = false) async throws(CircuitClientError) -> [HostView] {
        try await call("GET", "/v1/members", query: stale ? ["consistency": "stale"] : [:])
    }

    /// Asks the cluster to take `host` in as a learner; answers the membership's hosts (with their peer addresses).
    public func join(_ host: HostView, ttlMillis: UInt64) async throws(CircuitClientError) -> [HostView] {
        let body: Data
        do { body = try JSONEncoder().encode(host) } catch { throw .badAnswer("\(error)") }
        return try await call("POST", "/v1/cluster/members", query: ["ttl_ms": "\(ttlMillis)"], body: body)
    }

    /// Makes a learner a voter (refused while it lags the leader).
    public func promote(_ host: String) async throws(CircuitClientError) -> [HostView] {
        try await call("POST", "/v1/cluster/members/\(host)/promote")
    }

    /// Removes a host from Raft's membership and from the cluster.
    public func remove(_ host: String) async throws(CircuitClientError) -> [HostView] {
        try await call("DELETE", "/v1/cluster/members/\(host)")
    }

    /// A join token, accepted for `ttlSeconds` (1 to 7 days), with which a new host gets its certificate in the join
    /// exchange (`circuit join ADDRESS --token T --tls-dir DIR`). Needs the admin role, and a member started with the
    /// CA's key (`--tls-ca-key`); any other answers 503 `no_ca_key`.
    public func createToken(ttlSeconds: Int) async throws(CircuitClientError) -> TokenView {
        try await call("POST", "/v1/tokens", query: ["ttl": "\(ttlSeconds)"])
    }

    /// Asks the leader to hand leadership to `host` (nil: the most up-to-date voter); answers the target.
    public func transferLeader(to host: String? = nil) async throws(CircuitClientError) -> String {
        let answer: [String: String] = try await call("POST", "/v1/cluster/leader", query: host.map { ["to": $0] } ?? [:])
        return answer["to"] ?? ""
    }

    // MARK: - Records

    public func get(_ path: String, stale: Bool = false) async throws(CircuitClientError) -> RecordView {
        try await call("GET", "/v1/records" + Self.relative(path), query: stale ? ["consistency": "stale"] : [:])
    }

    /// Sets a record. `version`: only if the record is at this version (compare-and-set; 0: only if absent).
    /// `session`: tie the record to a session (ephemeral).
    @discardableResult
    public func put(
        _ path: String, _ value: [UInt8], version: UInt64? = nil, session: UInt64 = 0
    ) async throws(CircuitClientError) -> WriteView {
        var query: [String: String] = [:]
        if let version { query["version"] = "\(version)" }
        if session != 0 { query["session"] = "\(session)" }
        return try await call("PUT", "/v1/records" + Self.relative(path), query: query, body: Data(value))
    }

    /// Creates `prefix` followed by the parent's next sequence number; the answer's `path` names it.
    @discardableResult
    public func createSequential(_ prefix: String, _ value: [UInt8], session: UInt64 = 0) async throws(CircuitClientError) -> WriteView {
        try await call(
            "POST", "/v1/records" + Self.relative(prefix), query: session == 0 ? [:] : ["session": "\(session)"],
            body: Data(value))
    }

    @discardableResult
    public func delete(_ path: String, version: UInt64? = nil) async throws(CircuitClientError) -> WriteView {
        try await call("DELETE", "/v1/records" + Self.relative(path), query: version.map { ["version": "\($0)"] } ?? [:])
    }

    /// The names under `path` (any path of the namespace), or every path below it holding an element.
    public func list(_ path: String, recursive: Bool = false, stale: Bool = false) async throws(CircuitClientError) -> ListingView {
        var query: [String: String] = [:]
        if recursive { query["recursive"] = "1" }
        if stale { query["consistency"] = "stale" }
        let rooted = Self.rooted(path)
        return try await call("GET", "/v1/ls" + (rooted == "/" ? "" : rooted), query: query)
    }

    /// Applies every operation, in order, as one revision, or none (`transaction_failed` names the one that failed).
    @discardableResult
    public func transaction(_ ops: [TransactionOpView]) async throws(CircuitClientError) -> WriteView {
        let body: Data
        do { body = try JSONEncoder().encode(TransactionView(ops: ops)) } catch { throw .badAnswer("\(error)") }
        return try await call("POST", "/v1/txn", body: body)
    }

    /// What the anchor at `path` holds, and its children.
    public func peek(_ path: String, stale: Bool = false) async throws(CircuitClientError) -> ElementView {
        try await call("GET", "/v1/peek" + Self.rooted(path), query: stale ? ["consistency": "stale"] : [:])
    }

    /// Creates an element at `path` (under a live host, or a record under /records).
    @discardableResult
    public func create(_ path: String, _ element: ElementView) async throws(CircuitClientError) -> WriteView {
        let body: Data
        do { body = try JSONEncoder().encode(element) } catch { throw .badAnswer("\(error)") }
        return try await call("PUT", "/v1/namespace" + Self.rooted(path), body: body)
    }

    /// Removes the element at `path`.
    @discardableResult
    public func remove(element path: String, version: UInt64? = nil) async throws(CircuitClientError) -> WriteView {
        try await call("DELETE", "/v1/namespace" + Self.rooted(path), query: version.map { ["version": "\($0)"] } ?? [:])
    }

    // MARK: - Sessions

    public func grantSession(ttlMillis: UInt64, owner: String = "client") async throws(CircuitClientError) -> UInt64 {
        let view: WriteView = try await call("POST", "/v1/sessions", query: ["ttl_ms": "\(ttlMillis)", "owner": owner])
        return view.session
    }

    public func keepAlive(_ session: UInt64) async throws(CircuitClientError) {
        let _: [String: UInt64] = try await call("POST", "/v1/sessions/\(session)/keepalive")
    }

    public func revoke(_ session: UInt64) async throws(CircuitClientError) {
        let _: WriteView = try await call("DELETE", "/v1/sessions/\(session)")
    }

    // MARK: - HTTP

    /// `path` with a leading slash, to append to an endpoint's prefix (`/v1/peek` + `/X.../a`).
    static func rooted(_ path: String) -> String { path.hasPrefix("/") ? path : "/" + path }

    /// A record path relative to the records root: `/records/a/b`, `a/b` and `/a/b` all mean `/records/a/b`.
    static func relative(_ path: String) -> String {
        var p = path
        if p.hasPrefix("/records/") { p.removeFirst("/records".count) }
        return rooted(p)
    }

    /// One call to the first endpoint that answers. `ownConnection`: on a connection of its own, closed after the
    /// answer, instead of a pooled keep-alive one (for long waits, whose server side stops reading the connection).
    func call<T: Decodable>(
        _ method: String, _ path: String, query: [String: String] = [:], body: Data? = nil, ownConnection: Bool = false
    ) async throws(CircuitClientError) -> T {
        try await call(method, path, query: query, bytes: body.map { [UInt8]($0) }, ownConnection: ownConnection)
    }

    /// The same with the body as bytes (no copy through `Data`).
    func call<T: Decodable>(
        _ method: String, _ path: String, query: [String: String] = [:], bytes: [UInt8]?, ownConnection: Bool = false
    ) async throws(CircuitClientError) -> T {
        let data = Data(try await callRaw(method, path, query: query, bytes: bytes, ownConnection: ownConnection))
        do {
            return try JSONDecoder().decode(T.self, from: data)
        } catch {
            throw .badAnswer("\(error)")
        }
    }

    /// The same, answering the body's bytes as they came.
    func callRaw(
        _ method: String, _ path: String, query: [String: String] = [:], body: Data? = nil, ownConnection: Bool = false
    ) async throws(CircuitClientError) -> [UInt8] {
        try await callRaw(method, path, query: query, bytes: body.map { [UInt8]($0) }, ownConnection: ownConnection)
    }

    func callRaw(
        _ method: String, _ path: String, query: [String: String] = [:], bytes body: [UInt8]?, ownConnection: Bool = false
    ) async throws(CircuitClientError) -> [UInt8] {
        try await callRaw(method, path, query: query, buffer: body.map { ByteBuffer(bytes: $0) }, ownConnection: ownConnection)
    }

    /// The same with the body as a buffer (sent as it is, not copied).
    func callRaw(
        _ method: String, _ path: String, query: [String: String] = [:], buffer body: ByteBuffer?, ownConnection: Bool = false
    ) async throws(CircuitClientError) -> [UInt8] {
        try await callRaw(method, path, query: query, parts: body.map { [$0] } ?? [], ownConnection: ownConnection)
    }

    /// The same with the body as the concatenation of `parts`: on a connection of its own, sent as they are; on a
    /// kept-alive one, gathered first.
    func callRaw(
        _ method: String, _ path: String, query: [String: String] = [:], parts body: [ByteBuffer], ownConnection: Bool = false
    ) async throws(CircuitClientError) -> [UInt8] {
        var uri = Self.escape(path: path)
        if !query.isEmpty {
            uri += "?" + query.sorted { $0.key < $1.key }.map { "\(Self.escape($0.key))=\(Self.escape($0.value))" }.joined(separator: "&")
        }
        var lastError = "no endpoints given"
        let deadline = Duration.milliseconds(Int64(timeout * 1000))
        func send(to endpoint: String) async throws -> HTTPExchange.Answer {
            if ownConnection {
                return try await HTTPExchange.perform(HTTPMethod(rawValue: method), uri, to: endpoint, parts: body, timeout: deadline, tls: tls)
            }
            var gathered = body.first
            for part in body.dropFirst() { gathered!.writeImmutableBuffer(part) }
            return try await HTTPPool.shared(endpoint, tls: tls).perform(HTTPMethod(rawValue: method), uri, buffer: gathered, timeout: deadline)
        }
        for endpoint in endpoints {
            var answer: HTTPExchange.Answer
            do {
                answer = try await send(to: endpoint)
                // A node that does not own the element names the one that does: asked there, once.
                if answer.status == 307, let owner = answer.location.flatMap(Self.authority) {
                    answer = try await send(to: owner)
                }
            } catch {
                // Not sent, or only a read: the next endpoint may answer.
                guard (error as? HTTPExchangeError)?.requestNotSent == true || method == "GET" else {
                    throw .noAnswer(endpoint: endpoint, why: "\(error)")
                }
                lastError = "\(error)"
                continue
            }
            guard answer.status == 200 else { throw Self.apiError(status: answer.status, body: answer.body) }
            return answer.body
        }
        throw .unreachable(endpoints: endpoints, why: lastError)
    }

    /// `host:port` of an `http://host:port/...` URL.
    static func authority(_ url: String) -> String? { HTTPExchange.redirectAuthority(url) }

    /// The error an answer other than 200 carries (its envelope, or its text).
    static func apiError(status: Int, body: [UInt8]) -> CircuitClientError {
        if let envelope = try? JSONDecoder().decode(ErrorEnvelope.self, from: Data(body)) {
            return .api(APIError(status: status, code: envelope.error.code, message: envelope.error.message))
        }
        let text = String(decoding: body, as: UTF8.self)
        return .api(APIError(status: status, code: "http_\(status)", message: text.isEmpty ? "the node answered HTTP \(status)" : text))
    }

    /// `path` with each of its segments escaped.
    static func escape(path: String) -> String {
        path.split(separator: "/", omittingEmptySubsequences: false).map { escape(String($0)) }.joined(separator: "/")
    }

    /// Percent-encodes everything but unreserved characters.
    static func escape(_ s: String) -> String {
        var out = ""
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
                out.unicodeScalars.append(Unicode.Scalar(b))
            default:
                out += "%" + String(b, radix: 16, uppercase: true).leftPadded(2)
            }
        }
        return out
    }
}

extension String {
    fileprivate func leftPadded(_ n: Int) -> String { String(repeating: "0", count: max(0, n - count)) + self }
}
