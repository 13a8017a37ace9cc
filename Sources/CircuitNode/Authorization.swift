import CircuitAPI
import CircuitClient
import CircuitSecurity
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdCore
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOSSL

/// The API's request context: Hummingbird's, the connection the request came on, whose TLS certificate says who is
/// asking, and who that is (`Authorization` sets it before any route runs).
struct APIContext: RequestContext {
    var coreContext: CoreRequestContextStorage
    let channel: any Channel
    var caller = Caller(name: "", isMember: false)

    init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        channel = source.channel
    }
}

/// Who is asking, as far as the per-client limits and the sessions' owners go: the name in the client's certificate,
/// or without TLS its address. A member relaying a client's request (a follower forwarding to the leader, a worker
/// relaying to a member) names the client in `X-Circuit-Client`, and the request counts as the client's; a member
/// asking for itself is `isMember` and not limited. Without TLS nobody is authenticated: the headers are believed,
/// and the limits guard against accidents (a client leaking streams), not attacks.
struct Caller: Sendable, Hashable, CustomStringConvertible {
    var name: String
    var isMember: Bool
    /// A member relayed the request and named the client: that member checked what only the client may do.
    var isRelayed = false
    /// With TLS, whether the certificate allows acting on other clients' things (`admin` or `host`). Without TLS
    /// everyone may.
    var mayActForOthers = true

    static let header = HTTPField.Name("X-Circuit-Client")!

    /// The caller of a request on a connection with a certificate named `name`; `isMember`: it has the host role.
    static func certified(_ request: Request, grant: Grant) -> Caller {
        let isMember = grant.roles.contains(.host)
        if isMember, let client = request.headers[header], !client.isEmpty {
            return Caller(name: client, isMember: false, isRelayed: true)
        }
        return Caller(name: grant.name, isMember: isMember, mayActForOthers: grant.allows(.admin))
    }

    /// The caller of a request on a connection without TLS.
    static func unauthenticated(_ request: Request, channel: any Channel) -> Caller {
        if let client = request.headers[header], !client.isEmpty { return Caller(name: client, isMember: false, isRelayed: true) }
        return Caller(name: address(of: channel), isMember: request.headers[HTTPAPI.forwardedHeader] != nil)
    }

    /// The address of a connection without a certificate: its IP, without the port.
    static func address(of channel: any Channel) -> String {
        channel.remoteAddress?.ipAddress ?? "unknown"
    }

    /// What a member adds to a request it relays for this caller, so that the request stays the caller's.
    var relayHeaders: [(String, String)] { isMember ? [] : [(Self.header.rawName, name)] }

    var description: String { isMember ? "member \(name)" : name }
}

/// Which role each call of the API needs (see `AccessRole`). A pure function of the method and path, so that the table
/// is tested on its own; creating a process or a job (`PUT /v1/namespace/...` with kind `proc` or `job`) needs `exec`
/// where other elements need `write`, which `Authorization` decides from the body.
///
/// Two calls need no certificate at all (`isPublic`): the join exchange of a host that holds a join token and no
/// certificate yet. `GET /v1/join/ca` answers the CA certificate, which is no secret; `POST /v1/join/certificate`
/// is refused without a valid token.
public enum APIRoles {
    public static func required(_ method: HTTPRequest.Method, _ path: String) -> AccessRole {
        func under(_ prefix: String) -> Bool { path == prefix || path.hasPrefix(prefix + "/") }
        // What only members send each other: a host registering, a process's owner reporting its phase.
        if under("/v1/hosts") || under("/v1/proc-state") { return .host }
        // A join token lets its holder become a member: creating one is the admins' (as adding a member is).
        if under("/v1/debug") || under("/v1/cluster") || under("/v1/tokens") { return .admin }
        if under("/v1/signal") || under("/v1/proc") { return .exec }
        if under("/v1/chan") || under("/v1/select") { return .write }
        if method == .get || method == .head { return .read }
        // Records, transactions, sessions, elements: writes. So is any other path a future version adds, until
        // it is given its role here.
        return under("/v1/watch") || under("/v1/wait") || under("/v1/ls") || under("/v1/peek") ? .read : .write
    }

    /// Whether an element of this kind is a process (`exec`) rather than data (`write`).
    public static func kindNeedsExec(_ kind: String) -> Bool { kind == "proc" || kind == "job" }

    /// Whether the call is served to a client without a certificate: only the join exchange's two calls, exactly.
    public static func isPublic(_ method: HTTPRequest.Method, _ path: String) -> Bool {
        (method == .get && path == "/v1/join/ca") || (method == .post && path == "/v1/join/certificate")
    }
}

/// Checks each request's role against the certificate of its connection (mutual TLS), before any route runs. A
/// refusal is a 403 naming the role that was missing; a connection without a certificate (the API's TLS lets one
/// through for the join exchange) is refused every other call with a 401. Without TLS (loopback, or `--insecure`)
/// every caller may do everything, as in etcd and ZooKeeper without authentication.
struct Authorization: RouterMiddleware {
    typealias Context = APIContext
    let tls: TLSFiles?
    let grants = ConnectionGrants()
    let logger: Logger

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        var context = context
        guard tls != nil else {
            context.caller = Caller.unauthenticated(request, channel: context.channel)
            return try await next(request, context)
        }
        if APIRoles.isPublic(request.method, request.uri.path) {
            context.caller = Caller(name: Caller.address(of: context.channel), isMember: false)
            return try await next(request, context)
        }
        let grant = try await grants.grant(of: context.channel)
        context.caller = Caller.certified(request, grant: grant)
        var request = request
        let path = request.uri.path
        var needed = APIRoles.required(request.method, path)
        if needed == .write, !(grant.allows(.write) && grant.allows(.exec)), request.method == .put, path.hasPrefix("/v1/namespace/") {
            // The body is kept (collected, at most the API's limit) for the route that reads it next.
            let body = try await request.collectBody(upTo: HTTPAPI.maxBody)
            struct Kind: Decodable { var kind: String? }
            if let kind = try? JSONDecoder().decode(Kind.self, from: Data(buffer: body)).kind, APIRoles.kindNeedsExec(kind) {
                needed = .exec
            }
        }
        guard grant.allows(needed) else {
            logger.notice(
                "refused a request", metadata: ["who": "\(grant)", "request": "\(request.method) \(path)", "needs": "\(needed)"])
            throw APIError.forbidden("\(request.method) \(path) needs the \(needed.rawValue) role", grant: grant)
        }
        return try await next(request, context)
    }
}

/// The grant of each open connection, read from its certificate once (the first request) and forgotten when it
/// closes.
final class ConnectionGrants: Sendable {
    private let cache = NIOLockedValueBox<[ObjectIdentifier: Grant]>([:])

    func grant(of channel: any Channel) async throws -> Grant {
        let key = ObjectIdentifier(channel)
        if let grant = cache.withLockedValue({ $0[key] }) { return grant }
        let grant = try Self.grant(of: try await channel.nioSSL_peerCertificate().get())
        cache.withLockedValue { $0[key] = grant }
        channel.closeFuture.whenComplete { [cache] _ in cache.withLockedValue { $0[key] = nil } }
        return grant
    }
}

/// The API's connections with mutual TLS in front of Hummingbird's HTTP/1.1 channel. The TLS context is asked of
/// `TLSFiles` for each new connection, so rotated certificates are used without a restart. A client certificate is
/// asked for but not required (`apiServerContext`: a joining host has none yet; `Authorization` serves such a
/// connection the join exchange only). A handshake that fails (another CA's certificate, no TLS) is logged with the
/// peer's address.
struct ClusterTLSChannel<Base: ServerChildChannel>: ServerChildChannel {
    typealias Value = Base.Value
    let base: Base
    let tls: TLSFiles
    let logger: Logger

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls.apiServerContext()))
            try channel.pipeline.syncOperations.addHandler(TLSRefusalLogger(logger: self.logger, what: "API"))
        }.flatMap {
            base.setup(channel: channel, logger: logger)
        }
    }

    func handle(value: Value, logger: Logger) async {
        await base.handle(value: value, logger: logger)
    }
}

extension HTTPServerBuilder {
    /// HTTP/1.1 behind mutual TLS with the cluster's CA, and the binary protocol (`Wire`) beside it on the same port
    /// (`records`: what serves it; nil on a worker, which tells such a client to go to a member).
    static func clusterTLS(_ tls: TLSFiles, records: WireRecords?, logger: Logger) -> HTTPServerBuilder {
        .init { responder in
            LargeReadsChannel(
                base: ClusterTLSChannel(
                    base: WireOrHTTPChannel(
                        base: HTTP1Channel(responder: responder, configuration: .init()), records: records, tls: true, logger: logger),
                    tls: tls, logger: logger))
        }
    }

    /// HTTP/1.1 in plaintext (loopback, or `--insecure`), and the binary protocol beside it.
    static func plain(records: WireRecords?, logger: Logger) -> HTTPServerBuilder {
        .init { responder in
            LargeReadsChannel(
                base: WireOrHTTPChannel(
                    base: HTTP1Channel(responder: responder, configuration: .init()), records: records, tls: false, logger: logger))
        }
    }
}

/// A connection that reads up to `maximum` bytes at once when the peer sends that fast (NIO's default stops at 64
/// KiB): a channel's large messages and a process's stdin arrive in a few reads each instead of sixteen a MiB, each a
/// trip through the pipeline, the body's stream and a task switch. The size adapts back down for small requests. A
/// large read tells the allocator to keep free memory for the next one (`Allocator.noteLargeData`).
struct LargeReadsChannel<Base: ServerChildChannel>: ServerChildChannel {
    typealias Value = Base.Value
    static var maximum: Int { 1 << 20 }
    let base: Base

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        channel.setOption(
            ChannelOptions.recvAllocator,
            value: NotingLargeReads(base: AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 2048, maximum: Self.maximum))
        ).flatMap { base.setup(channel: channel, logger: logger) }
    }

    func handle(value: Value, logger: Logger) async {
        await withTaskExecutorPreference(EventLoopTaskExecutor(value.channel.eventLoop)) {
            await base.handle(value: value, logger: logger)
        }
    }
}

/// NIO's adaptive read sizes, and a word to the allocator when a read is a large message's.
struct NotingLargeReads: RecvByteBufferAllocator {
    var base: AdaptiveRecvByteBufferAllocator
    var note: @Sendable () -> Void = Allocator.noteLargeData

    func buffer(allocator: ByteBufferAllocator) -> ByteBuffer { base.buffer(allocator: allocator) }
    func nextBufferSize() -> Int? { base.nextBufferSize() }

    mutating func record(actualReadBytes: Int) -> Bool {
        if actualReadBytes >= Allocator.largeData { note() }
        return base.record(actualReadBytes: actualReadBytes)
    }
}

extension ConnectionGrants {
    /// The grant a client's certificate proves (the HTTP API and the wire protocol alike), or why it proves none.
    static func grant(of certificate: NIOSSLCertificate?) throws(APIError) -> Grant {
        guard let certificate else {
            throw APIError(status: 401, code: "no_certificate", message: "this API needs a client certificate of the cluster's CA")
        }
        do { return try TLSFiles.grant(of: certificate) } catch {
            throw APIError(status: 401, code: "bad_certificate", message: "\(error)")
        }
    }
}

extension APIError {
    /// 403: `what` ("GET /v1/x needs the write role"), then the roles `grant`'s certificate carries.
    static func forbidden(_ what: String, grant: Grant) -> APIError {
        APIError(
            status: 403, code: "forbidden",
            message: "\(what); the certificate of \(grant.name) carries "
                + (grant.roles.isEmpty ? "none" : grant.roles.sorted().map(\.rawValue).joined(separator: ", ")))
    }
}
