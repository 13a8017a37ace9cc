import CircuitAPI
import Foundation

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// Why a call to the cluster failed.
public enum CircuitClientError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The cluster answered with an error.
    case api(APIError)
    /// No endpoint could be reached.
    case unreachable(endpoints: [String], why: String)
    /// The answer was not what the API documents.
    case badAnswer(String)

    public var description: String {
        switch self {
        case .api(let e): return e.message
        case .unreachable(let endpoints, let why):
            return "cannot reach the cluster at \(endpoints.joined(separator: ", ")): \(why)"
        case .badAnswer(let why): return "unexpected answer from the cluster: \(why)"
        }
    }
}

/// Async calls to a Circuit cluster's HTTP/JSON API (docs/http-api.md). Any node answers: writes and linearizable
/// reads sent to a follower are forwarded to the leader. If a node cannot be reached, the next endpoint is tried.
public struct CircuitClient: Sendable {
    public let endpoints: [String]
    public var timeout: TimeInterval = 10

    /// `endpoints`: `host:port` of one or more nodes' APIs.
    public init(endpoints: [String]) {
        self.endpoints = endpoints
    }

    // MARK: - The cluster

    public func status() async throws(CircuitClientError) -> StatusView { try await call("GET", "/v1/status") }

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
        return try await call("GET", "/v1/ls" + (path.hasPrefix("/") ? path : "/" + path), query: query)
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

    /// A record path relative to the records root: `/records/a/b`, `a/b` and `/a/b` all mean `/records/a/b`.
    static func relative(_ path: String) -> String {
        var p = path
        if p.hasPrefix("/records/") { p.removeFirst("/records".count) }
        return p.hasPrefix("/") ? p : "/" + p
    }

    func call<T: Decodable>(
        _ method: String, _ path: String, query: [String: String] = [:], body: Data? = nil
    ) async throws(CircuitClientError) -> T {
        var lastError = "no endpoints given"
        for endpoint in endpoints {
            var components = URLComponents()
            components.scheme = "http"
            let parts = endpoint.split(separator: ":")
            components.host = parts.dropLast().joined(separator: ":")
            components.port = parts.last.flatMap { Int($0) }
            components.path = path
            if !query.isEmpty { components.queryItems = query.sorted { $0.key < $1.key }.map { URLQueryItem(name: $0.key, value: $0.value) } }
            guard let url = components.url else { throw .badAnswer("cannot make a URL of \(endpoint) and \(path)") }
            var request = URLRequest(url: url, timeoutInterval: timeout)
            request.httpMethod = method
            request.httpBody = body
            let data: Data, response: URLResponse
            do {
                (data, response) = try await URLSession.shared.data(for: request)
            } catch {
                lastError = error.localizedDescription
                continue
            }
            let status = (response as? HTTPURLResponse)?.statusCode ?? 0
            guard status == 200 else {
                if let envelope = try? JSONDecoder().decode(ErrorEnvelope.self, from: data) {
                    throw .api(APIError(status: status, code: envelope.error.code, message: envelope.error.message))
                }
                throw .api(APIError(status: status, code: "http_\(status)", message: String(decoding: data, as: UTF8.self)))
            }
            do {
                return try JSONDecoder().decode(T.self, from: data)
            } catch {
                throw .badAnswer("\(error)")
            }
        }
        throw .unreachable(endpoints: endpoints, why: lastError)
    }
}
