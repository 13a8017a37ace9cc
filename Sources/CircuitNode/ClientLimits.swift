import CircuitAPI
import Hummingbird
import Logging
import Synchronization

/// What one client may have open on this node at once: requests (a streamed answer counts until its last byte) and,
/// among them, watches and waits (each holds a stream of the applied changes). Past a limit a request is refused
/// with a 429 naming the limit and the client, before any route runs; what the client already has open goes on.
/// Members asking for themselves are not limited (`Caller.isMember`); a member relaying a client's request counts
/// it as the client's.
///
/// A pure count keyed by the caller's name: `admit` and `release` are all there is, so the rules are tested without
/// a server.
struct ClientLimitCounts: Sendable {
    struct Limits: Sendable, Equatable {
        var streams: Int
        var watches: Int
    }

    struct Open: Sendable, Equatable {
        var streams = 0
        var watches = 0
    }

    enum Refusal: Error, Equatable {
        case streams(limit: Int)
        case watches(limit: Int)
    }

    let limits: Limits
    private(set) var open: [String: Open] = [:]

    init(limits: Limits) { self.limits = limits }

    /// Counts a request of `client` in, or says which limit it would pass.
    mutating func admit(_ client: String, watch: Bool) -> Refusal? {
        var now = open[client, default: Open()]
        guard now.streams < limits.streams else { return .streams(limit: limits.streams) }
        if watch {
            guard now.watches < limits.watches else { return .watches(limit: limits.watches) }
            now.watches += 1
        }
        now.streams += 1
        open[client] = now
        return nil
    }

    /// Counts an admitted request out. A client with nothing open is forgotten.
    mutating func release(_ client: String, watch: Bool) {
        guard var now = open[client] else { return }
        now.streams -= 1
        if watch { now.watches -= 1 }
        open[client] = now.streams > 0 ? now : nil
    }
}

/// The middleware that applies `ClientLimitCounts` to the API.
struct ClientLimits: RouterMiddleware {
    typealias Context = APIContext
    private let counts: Counts
    let logger: Logger

    init(limits: ClientLimitCounts.Limits, logger: Logger) {
        counts = Counts(ClientLimitCounts(limits: limits))
        self.logger = logger
    }

    private final class Counts: Sendable {
        let mutex: Mutex<ClientLimitCounts>
        init(_ counts: ClientLimitCounts) { mutex = Mutex(counts) }
    }

    /// A watch, or a wait (`GET /v1/wait/...`, which watches until the process ends).
    static func isWatchPath(_ method: String, _ path: String) -> Bool {
        method == "GET" && (path == "/v1/watch" || path.hasPrefix("/v1/watch/") || path.hasPrefix("/v1/wait/"))
    }

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let caller = context.caller
        if caller.isMember { return try await next(request, context) }
        let watch = Self.isWatchPath(request.method.rawValue, request.uri.path)
        if let refusal = counts.mutex.withLock({ $0.admit(caller.name, watch: watch) }) {
            let (what, limit): (String, Int)
            switch refusal {
            case .streams(let n): (what, limit) = ("requests open (streams included)", n)
            case .watches(let n): (what, limit) = ("watches and waits open", n)
            }
            logger.notice("refused a request past a per-client limit", metadata: ["client": "\(caller.name)", "limit": "\(what): \(limit)"])
            let code = if case .watches = refusal { "too_many_watches" } else { "too_many_streams" }
            throw APIError(
                status: 429, code: code,
                message: "\(caller.name) already has \(limit) \(what) on this node, the most one client may have: close one first")
        }
        let ticket = ReleaseOnce { [counts, name = caller.name] in counts.mutex.withLock { $0.release(name, watch: watch) } }
        let response: Response
        do {
            response = try await next(request, context)
        } catch {
            ticket.release()
            throw error
        }
        guard response.body.contentLength == nil else {
            // The whole answer is in hand: what remains is writing it.
            ticket.release()
            return response
        }
        // A streamed answer stays open until its last byte is written, or until it is dropped unwritten (the client
        // went away first): the ticket is released by whichever comes first.
        var streamed = response
        let body = response.body
        streamed.body = ResponseBody { writer in
            defer { ticket.release() }
            try await body.write(writer)
        }
        return streamed
    }
}
