import CircuitAPI
import CircuitClient
import CircuitSecurity
import CircuitStateMachine
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import NIOHTTP1
import ServiceLifecycle
import Synchronization

/// A worker host: in the cluster's membership (it registers, keeps its session alive, and what it owns lives under
/// its name) but not in Raft: it keeps no log and takes no part in elections, so a cluster of thousands of hosts
/// still has 3 or 5 voters. Its API relays each request to a member (the leader first, when known) and relays the
/// answer; its own status names it a worker.
///
/// The members it knows are kept in `contacts` in its data folder (their API addresses) and refreshed from the
/// membership every few seconds, so a restart finds the cluster even after the members it joined through are gone.
final class WorkerNode: Sendable {
    let folder: DataFolder
    let clusterID: UInt64
    let config: NodeConfig
    /// Mutual TLS on its API (nil: plaintext).
    let tls: TLSFiles?
    let logger: Logger
    private let upstream: Mutex<Upstream>

    private struct Upstream {
        /// The leader's API address, as last seen.
        var leader: String?
        /// Every member's API address.
        var members: [String]
    }

    init(folder: DataFolder, clusterID: UInt64, config: NodeConfig, tls: TLSFiles?, logger: Logger) throws {
        self.folder = folder
        self.clusterID = clusterID
        self.config = config
        self.tls = tls
        self.logger = logger
        let contacts = Self.readContacts(folder)
        guard !contacts.isEmpty else {
            throw DataFolderError.unreadable(path: "\(folder.path)/contacts", why: "a worker's folder names no member to reach")
        }
        upstream = Mutex(Upstream(leader: nil, members: contacts))
    }

    /// Runs the API and the agent until SIGTERM or SIGINT; then ends this host's session, so it leaves at once.
    func run() async throws {
        let router = CircuitDaemon.router(tls: tls, config: config, logger: logger)
        let ownerAddress: @Sendable (String) async throws -> String? = { [self] host in
            let answer = try await relay(.GET, "/v1/members?consistency=stale", body: nil)
            let hosts = try JSONDecoder().decode([HostView].self, from: Data(answer.body))
            return hosts.first { $0.id == host && $0.state == "alive" }?.clientAddress
        }
        let runtime = HostRuntime(config: config, hostID: folder.hostID, logger: logger, ownerAddress: ownerAddress)
        router.add(middleware: ChannelRoutes(hostID: folder.hostID, channels: runtime.channels, ownerAddress: ownerAddress))
        router.add(middleware: StdioRoutes(runtime: runtime, ownerAddress: ownerAddress))
        router.add(middleware: SelectRoutes(runtime: runtime, ownerAddress: ownerAddress))
        router.add(middleware: WorkerRelay(worker: self, runner: runtime.procs))
        try await CircuitDaemon.serve(
            router, beside: [WorkerAgent(worker: self), HostRuntimeService(runtime: runtime)], config: config, tls: tls, logger: logger)
        logger.info("stopped")
    }

    // MARK: - Relaying

    /// Where to send a request: the leader first, then the other members.
    var candidates: [String] {
        upstream.withLock { u in
            var out = u.leader.map { [$0] } ?? []
            for m in u.members where !out.contains(m) { out.append(m) }
            return out
        }
    }

    /// Sends a request to the members in turn (the leader first) until one answers it. A member that cannot be
    /// reached, or answers `no_leader` (it neither applied nor forwarded the request), is passed over. A request that
    /// reached a member and then failed is sent to another only if it is `idempotent` (a read, a keep-alive): a
    /// write may have been applied, so that is a 503 naming the member.
    func relay(
        _ method: NIOHTTP1.HTTPMethod, _ uri: String, body: [UInt8]?, headers: [(String, String)] = [], idempotent: Bool? = nil,
        timeout: Duration = .seconds(10), ownConnection: Bool = false
    ) async throws -> HTTPExchange.Answer {
        let retryable = idempotent ?? (method == .GET)
        var tried: [String] = []
        var lastAnswer: HTTPExchange.Answer?
        for address in candidates {
            tried.append(address)
            do {
                let answer =
                    ownConnection
                    ? try await HTTPExchange.perform(method, uri, to: address, body: body, headers: headers, timeout: timeout)
                    : try await HTTPPool.shared(address).perform(method, uri, body: body, headers: headers, timeout: timeout)
                if answer.status == 503,
                    (try? JSONDecoder().decode(ErrorEnvelope.self, from: Data(answer.body)))?.error.code == "no_leader"
                {
                    forgetLeader(address)
                    lastAnswer = answer
                    continue
                }
                return answer
            } catch let error as HTTPExchangeError where error.requestNotSent {
                forgetLeader(address)
            } catch {
                forgetLeader(address)
                guard retryable else {
                    throw APIError(
                        status: 503, code: "outcome_unknown",
                        message: "the member at \(address) did not answer, so the request may or may not have been applied: \(error)")
                }
            }
        }
        if let lastAnswer { return lastAnswer }
        throw APIError(
            status: 503, code: "cluster_unreachable",
            message: "this worker reached no member of its cluster (tried \(tried.joined(separator: ", ")))")
    }

    private func forgetLeader(_ address: String) {
        upstream.withLock { if $0.leader == address { $0.leader = nil } }
    }

    /// The cluster's status as a member sees it, with this host's id and role.
    func status() async throws -> StatusView {
        let answer = try await relay(.GET, "/v1/status", body: nil)
        guard answer.status == 200, var view = try? JSONDecoder().decode(StatusView.self, from: Data(answer.body)) else {
            throw APIError(status: 503, code: "member_unreachable", message: "a member answered the status with HTTP \(answer.status)")
        }
        view.host = folder.hostID
        view.role = "worker"
        view.security = config.security
        return view
    }

    /// Learns the leader and the members again: asks every member it knows for its status (2 s each, at once) and
    /// believes the one with the highest term that names a leader; then reads the membership there. The members'
    /// addresses are kept merged with those known before (at most 16), so members down for a while are not forgotten.
    func refresh() async {
        let views = await withTaskGroup(of: (String, StatusView)?.self) { group in
            for address in candidates {
                group.addTask {
                    guard let answer = try? await HTTPPool.shared(address).perform(.GET, "/v1/status", timeout: .seconds(2)),
                        answer.status == 200, let view = try? JSONDecoder().decode(StatusView.self, from: Data(answer.body))
                    else { return nil }
                    return (address, view)
                }
            }
            var out: [(String, StatusView)] = []
            for await v in group { if let v { out.append(v) } }
            return out
        }
        for (address, view) in views where view.cluster != HostID.hex(clusterID) {
            logger.error("a member belongs to another cluster; not using it", metadata: ["cluster": "\(view.cluster)", "member": "\(address)"])
        }
        guard let (source, view) = views.filter({ $0.1.cluster == HostID.hex(clusterID) && $0.1.leader != nil }).max(by: { $0.1.term < $1.1.term }),
            let answer = try? await HTTPPool.shared(source).perform(.GET, "/v1/members?consistency=stale", timeout: .seconds(2)),
            answer.status == 200, let hosts = try? JSONDecoder().decode([HostView].self, from: Data(answer.body))
        else { return }
        let fresh = Self.contacts(in: hosts, fallback: nil)
        let leader = hosts.first { $0.id == view.leader }?.clientAddress
        let (before, after) = upstream.withLock { u in
            let before = u.members
            var merged = fresh
            for m in before where !merged.contains(m) { merged.append(m) }
            u = Upstream(leader: leader ?? u.leader, members: Array(merged.prefix(16)))
            return (before, u.members)
        }
        if before != after {
            do {
                try Self.writeContacts(after, folder: folder)
                logger.info("members", metadata: ["contacts": "\(after)"])
            } catch {
                logger.warning("could not keep the members' addresses", metadata: ["error": "\(error)"])
            }
        }
    }

    // MARK: - Contacts

    /// The API addresses of the alive voters and learners (or `fallback` if there are none).
    static func contacts(in hosts: [HostView], fallback: String?) -> [String] {
        let members = hosts.filter { ($0.role == "voter" || $0.role == "learner") && $0.state == "alive" }
            .sorted { ($0.role == "voter" ? 0 : 1, $0.id) < ($1.role == "voter" ? 0 : 1, $1.id) }.map(\.clientAddress)
        return members.isEmpty ? (fallback.map { [$0] } ?? []) : members
    }

    static func writeContacts(_ contacts: [String], folder: DataFolder) throws {
        try DataFolder.writeDurably(contacts.joined(separator: "\n") + "\n", to: "\(folder.path)/contacts")
    }

    static func readContacts(_ folder: DataFolder) -> [String] {
        ((try? String(contentsOfFile: "\(folder.path)/contacts", encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
    }
}

/// A worker's whole API: its own status; a watch streamed through from a member; everything else relayed whole.
struct WorkerRelay: RouterMiddleware {
    typealias Context = APIContext
    let worker: WorkerNode
    let runner: ProcRunner

    func handle(
        _ request: Request, context: Context, next: (Request, Context) async throws -> Response
    ) async throws -> Response {
        let path = request.uri.path
        if path == "/v1/status", request.method == .get { return try json(try await worker.status()) }
        if path == "/v1/sys", request.method == .get { return try json(HostFacts.view(of: try await worker.status())) }
        let uri = path + (request.uri.query.map { "?" + $0 } ?? "")
        if path.hasPrefix("/v1/watch/") || path == "/v1/watch", request.method == .get { return watch(uri, request: request) }
        if path.hasPrefix("/v1/signal/"), request.method == .post {
            // A signal for a process of this host is delivered here; any other goes to a member, which sends it on.
            let target = String(path.dropFirst("/v1/signal".count))
            if Names.host(of: target) == worker.folder.hostID {
                return try await HTTPAPI.deliverSignal(target, request: request, runner: runner, ownHost: worker.folder.hostID) {
                    let answer = try await worker.relay(.GET, "/v1/peek" + target, body: nil)
                    return try JSONDecoder().decode(ElementView.self, from: Data(answer.body))
                }
            }
        }
        // A wait lasts as long as its process: no deadline of its own, a connection of its own, and it ends when
        // the client hangs up.
        if path.hasPrefix("/v1/wait/"), request.method == .get {
            let answer = try await request.body.consumeWithCancellationOnInboundClose { _ in
                try await worker.relay(
                    .GET, uri, body: nil, headers: context.caller.relayHeaders, timeout: .seconds(7 * 24 * 3600), ownConnection: true)
            }
            return Response(relaying: answer)
        }
        var request = request
        let body = try await request.collectBody(upTo: HTTPAPI.maxBody)
        let answer = try await worker.relay(
            NIOHTTP1.HTTPMethod(rawValue: request.method.rawValue), uri, body: body.readableBytes > 0 ? Array(buffer: body) : nil,
            headers: context.caller.relayHeaders)
        return Response(relaying: answer)
    }

    /// Streams a member's watch through, line by line, holding at most `buffer` lines: a reader that falls that far
    /// behind gets an error line (code `compacted`), as from a member, and the stream ends.
    private func watch(_ uri: String, request: Request, buffer: Int = 10_000) -> Response {
        let candidates = worker.candidates
        let body = ResponseBody { writer in
            let (lines, sink) = AsyncThrowingStream<[UInt8], any Error>.makeStream(bufferingPolicy: .bufferingOldest(buffer))
            let pump = Task {
                for address in candidates {
                    do {
                        let (status, errorBody) = try await HTTPExchange.stream(uri, to: address) { line in
                            if case .dropped = sink.yield(line) { throw WatchRelayOverflow() }
                        }
                        if status != 200 { sink.yield(errorBody) }
                        sink.finish()
                        return
                    } catch HTTPExchangeError.connect {
                        continue
                    } catch is WatchRelayOverflow {
                        sink.finish(throwing: WatchRelayOverflow())
                        return
                    } catch {
                        sink.finish(throwing: error)
                        return
                    }
                }
                sink.finish(throwing: APIError(
                    status: 503, code: "cluster_unreachable", message: "this worker reached no member of its cluster for the watch"))
            }
            defer { pump.cancel() }
            do {
                // A client that hangs up ends the relay (and the member's watch) at once.
                try await request.body.consumeWithCancellationOnInboundClose { _ in
                    for try await line in lines { try await writer.write(ByteBuffer(bytes: line + [UInt8(ascii: "\n")])) }
                }
            } catch is CancellationError {
                return  // the client is gone: nothing to finish
            } catch {
                let reason: APIError
                switch error {
                case is WatchRelayOverflow:
                    reason = APIError(status: 410, code: "compacted", message: "the watch fell too far behind; resume from the last revision seen")
                case let e as APIError:
                    reason = e
                default:
                    reason = APIError(status: 503, code: "member_unreachable", message: "the member's watch ended: \(error)")
                }
                try await writer.write(try ndjsonLine(ErrorEnvelope(reason)))
            }
            try await writer.finish(nil)
        }
        return Response(status: .ok, headers: [.contentType: "application/x-ndjson"], body: body)
    }
}

private struct WatchRelayOverflow: Error {}

/// A worker's part in the membership: it registers itself with the leader (through a member), keeps its session
/// alive, registers again if the session was lost, and ends the session when the daemon stops.
struct WorkerAgent: Service {
    let worker: WorkerNode

    func run() async throws {
        // The members and the leader are learnt again every 3 s, beside the keep-alives (never in their way).
        let worker = self.worker
        let refresher = Task {
            while !Task.isCancelled {
                await worker.refresh()
                try? await Task.sleep(for: .seconds(3))
            }
        }
        defer { refresher.cancel() }
        var session: UInt64?
        let ttl = worker.config.sessionTTLMillis
        var schedule = KeepAliveSchedule(ttlMillis: ttl, now: .now)
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            if session == nil {
                let sent = ContinuousClock.now
                session = await register(ttl: ttl)
                if session != nil { schedule.answered(sentAt: sent, at: .now) }
            } else if let s = session, schedule.isDue(now: .now) {
                // The timeout holds for each member the relay tries in turn (the leader it knows first).
                let sent = ContinuousClock.now
                let outcome = KeepAliveOutcome(
                    status: try? await worker.relay(
                        .POST, "/v1/sessions/\(s)/keepalive", body: nil, idempotent: true, timeout: schedule.callTimeout
                    ).status)
                if outcome == .gone {
                    worker.logger.warning("the session was lost; registering again", metadata: ["session": "\(s)"])
                    session = nil
                }
                schedule.record(outcome, sentAt: sent, at: .now)?.log(to: worker.logger, session: s)
            }
            try? await cancelWhenGracefulShutdown { try await Task.sleep(for: .milliseconds(100)) }
        }
        if let session, (try? await worker.relay(.DELETE, "/v1/sessions/\(session)", body: nil))?.status == 200 {
            worker.logger.info("left the membership", metadata: ["session": "\(session)"])
        }
    }

    private func register(ttl: UInt64) async -> UInt64? {
        await registerHost(hostID: worker.folder.hostID, role: "worker", ttl: ttl, config: worker.config, logger: worker.logger) {
            uri, body in
            guard let answer = try? await worker.relay(.POST, uri, body: body) else { return nil }
            return (answer.status, Data(answer.body))
        }
    }
}

extension Response {
    /// Another node's answer, passed on as it came: status, content type and body.
    init(relaying answer: HTTPExchange.Answer) {
        var headers = HTTPFields()
        headers[.contentType] = answer.contentType ?? "application/json"
        self.init(status: .init(code: answer.status), headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: answer.body)))
    }
}
