import CircuitAPI
import CircuitClient
import CircuitRaft
import CircuitStateMachine
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore


extension APIError {
    static func from(_ error: ControlError) -> APIError {
        switch error {
        case .invalidName: return APIError(status: 400, code: "invalid_name", message: error.description)
        case .exists: return APIError(status: 409, code: "exists", message: error.description)
        case .notFound: return APIError(status: 404, code: "not_found", message: error.description)
        case .versionMismatch: return APIError(status: 409, code: "version_mismatch", message: error.description)
        case .wrongKind: return APIError(status: 409, code: "wrong_kind", message: error.description)
        case .noSuchSession: return APIError(status: 404, code: "no_such_session", message: error.description)
        case .noSuchHost: return APIError(status: 404, code: "no_such_host", message: error.description)
        case .hostNotAlive: return APIError(status: 409, code: "host_not_alive", message: error.description)
        case .transactionFailed: return APIError(status: 409, code: "transaction_failed", message: error.description)
        case .malformedCommand: return APIError(status: 400, code: "malformed_command", message: error.description)
        case .tooManySessions: return APIError(status: 429, code: "too_many_sessions", message: error.description)
        }
    }

    static func from(_ error: ControlServiceError) -> APIError {
        switch error {
        case .notLeader: return APIError(status: 503, code: "no_leader", message: error.description)
        case .outcomeUnknown: return APIError(status: 503, code: "outcome_unknown", message: error.description)
        case .refused: return APIError(status: 503, code: "refused", message: error.description)
        case .unavailable: return APIError(status: 503, code: "unavailable", message: error.description)
        case .badAnswer: return APIError(status: 500, code: "internal", message: error.description)
        }
    }

}

/// The HTTP/JSON API of one node (see docs/http-api.md).
///
/// Writes, linearizable reads and keep-alives need the leader: a follower forwards them to the leader's API (the
/// address the leader registered) and relays the answer. Stale reads, status and watches are served locally.
struct HTTPAPI: Sendable {
    let node: NodeContext
    let runner: ProcRunner
    static let maxBody = 1 << 20
    static let forwardedHeader = HTTPField.Name("X-Circuit-Forwarded")!

    func router() -> Router<APIContext> {
        let router = CircuitDaemon.router(tls: node.transport.configuration.tls, config: node.config, logger: node.logger)
        JoinRoutes(node: node).add(to: router)
        router.get("/v1/status") { _, _ in try json(node.status()) }
        router.get("/v1/sys") { _, _ in try json(HostFacts.view(of: node.status())) }
        // Tests only: cut this node's Raft traffic to and from chosen hosts (`{"to": [ids], "from": [ids]}`; empty
        // heals), where the chaos suite cannot cut the network itself.
        router.put("/v1/debug/cut") { request, _ in
            guard node.config.testFaults else {
                throw APIError(status: 403, code: "test_faults_off", message: "fault injection is off: only a daemon started with --test-faults allows it")
            }
            let cut = try await decodeBody(request, as: [String: [String]].self, what: #"{"to": [host ids], "from": [host ids]}"#)
            for id in (cut["to"] ?? []) + (cut["from"] ?? []) where !HostID.isValid(id) {
                throw APIError.badRequest("\(id) is not a host id (X and 16 lowercase hex digits)")
            }
            node.transport.cut(
                sendingTo: Set((cut["to"] ?? []).map(HostID.nodeID)), receivingFrom: Set((cut["from"] ?? []).map(HostID.nodeID)))
            return try json(["ok": true])
        }
        // The whole replicated state this node has applied, as the bytes of its snapshot (equal states, equal bytes;
        // the applied index is inside): what the chaos tests compare across replicas.
        router.get("/v1/debug/state") { _, _ in
            // A copy is taken under the lock (the apply thread needs it); the bytes are written outside.
            let copy = node.service.state.read { $0 }
            return Response(
                status: .ok, headers: [.contentType: "application/octet-stream"], body: .init(byteBuffer: ByteBuffer(bytes: copy.snapshot())))
        }
        router.get("/v1/members") { request, context in
            try await leaderOr(request, context, stale: isStale(request), read: true) {
                try json(try await node.service.read(consistency(request)) { state in state.hostList.map(HostView.init) })
            }
        }
        router.get("/v1/records/**") { request, context in
            let path = try recordPath(context)
            return try await leaderOr(request, context, stale: isStale(request), read: true) {
                let view: RecordView? = try await node.service.read(consistency(request)) { state in
                    guard let anchor = state.anchors[path], case .record(let bytes) = anchor.element else { return nil }
                    return RecordView(
                        path: path, value: String(decoding: bytes, as: UTF8.self),
                        valueBase64: Data(bytes).base64EncodedString(), version: anchor.version,
                        createRevision: anchor.createRevision, modRevision: anchor.modRevision, session: anchor.session,
                        revision: state.revision)
                }
                guard let view else { throw APIError.from(.notFound(path: path)) }
                return try json(view)
            }
        }
        router.put("/v1/records/**") { request, context in
            let path = try recordPath(context)
            let request = try await Self.buffered(request)
            return try await leaderOr(request, context, stale: false, write: true) {
                var request = request
                let body = try await request.collectBody(upTo: Self.maxBody)
                let value = Array(buffer: body)
                let session = try query(request, "session", as: UInt64.self) ?? 0
                let command: Command
                if let version = try query(request, "version", as: UInt64.self) {
                    command = version == 0
                        ? .create(path: path, element: .record(value), session: session, sequential: false)
                        : .compareAndSet(path: path, version: version, value: value)
                } else {
                    command = .put(path: path, value: value, session: session)
                }
                return try await write(command, forward: true)
            }
        }
        router.post("/v1/records/**") { request, context in
            // A sequential create: PATH is the prefix; the answer names the record made.
            let path = try recordPath(context)
            let request = try await Self.buffered(request)
            return try await leaderOr(request, context, stale: false, write: true) {
                var request = request
                let value = Array(buffer: try await request.collectBody(upTo: Self.maxBody))
                let session = try query(request, "session", as: UInt64.self) ?? 0
                return try await write(.create(path: path, element: .record(value), session: session, sequential: true), forward: true)
            }
        }
        router.delete("/v1/records/**") { request, context in
            let path = try recordPath(context)
            let request = try await Self.buffered(request)
            return try await leaderOr(request, context, stale: false, write: true) {
                try await write(.delete(path: path, version: try query(request, "version", as: UInt64.self)), forward: true)
            }
        }
        router.get("/v1/peek/**") { request, context in
            let path = "/" + context.parameters.getCatchAll().joined(separator: "/")
            if let error = Names.validate(path) { throw APIError.from(error) }
            return try await leaderOr(request, context, stale: isStale(request), read: true) {
                let view: ElementView? = try await node.service.read(consistency(request)) { state in
                    guard let anchor = state.anchors[path] else { return nil }
                    var view = ElementView(anchor: anchor, path: path)
                    view.children = state.children(of: path)
                    return view
                }
                guard let view else { throw APIError.from(.notFound(path: path)) }
                return try json(view)
            }
        }
        router.put("/v1/namespace/**") { request, context in
            // Creates an element where none is (a record, a channel, a process's name, a select, a subscription).
            let path = "/" + context.parameters.getCatchAll().joined(separator: "/")
            return try await leaderOr(request, context, stale: false) {
                let view = try await decodeBody(request, as: ElementView.self, what: "an element")
                let element: Element
                switch view.kind {
                case "record": element = .record(Array((view.value ?? "").utf8))
                case "chan": element = .chan(capacity: view.capacity ?? 0)
                case "proc", "job":
                    guard let c = view.command, !c.path.isEmpty else { throw APIError.badRequest("a \(view.kind) needs a command with a path") }
                    let command = ProcCommand(path: c.path, args: c.args ?? [], env: c.env ?? [], dir: c.dir ?? "")
                    if view.kind == "proc" {
                        element = .proc(ProcState(command: command))
                    } else {
                        let attempts = view.maxAttempts ?? 3
                        guard (1...100).contains(attempts) else { throw APIError.badRequest("max_attempts is 1 to 100, not \(attempts)") }
                        element = .job(JobState(command: command, maxAttempts: attempts))
                    }
                case "select":
                    _ = try Selects.clauses(view.clauses ?? "")
                    element = .select(clauses: Array((view.clauses ?? "").utf8))
                case "subscription":
                    guard let kind = view.events.flatMap({ $0 == "join" ? SubscriptionKind.join : $0 == "leave" ? .leave : nil }) else {
                        throw APIError.badRequest("a subscription needs events: join or leave")
                    }
                    element = .subscription(kind)
                case "reserved":
                    guard let kind = view.reserves, Element.reservable.contains(kind) else {
                        throw APIError.badRequest("a reservation needs reserves: proc, chan or select")
                    }
                    element = .reserved(kind)
                default:
                    throw APIError.badRequest(
                        "unknown kind \(view.kind.debugDescription) (record, chan, proc, job, select, subscription, reserved)")
                }
                let answer = try await write(.create(path: path, element: element, session: view.session ?? 0, sequential: false))
                if case .job = element { node.jobsChanged.ring() }
                return answer
            }
        }
        router.delete("/v1/namespace/**") { request, context in
            let path = "/" + context.parameters.getCatchAll().joined(separator: "/")
            return try await leaderOr(request, context, stale: false) {
                // A job's current attempt goes with it (its host then stops the process).
                let attempt: String? = node.service.state.read { state in
                    guard case .job(let j)? = state.anchors[path]?.element, j.phase == .placed else { return nil }
                    return JobKeeper.processPath(job: path, host: j.host)
                }
                let answer = try await write(.delete(path: path, version: try query(request, "version", as: UInt64.self)))
                if let attempt { _ = try? await node.service.execute(.delete(path: attempt, version: nil)) }
                return answer
            }
        }
        router.post("/v1/txn") { request, context in
            let request = try await Self.buffered(request)
            return try await leaderOr(request, context, stale: false, write: true) {
                let txn = try await decodeBody(request, as: TransactionView.self, what: "a transaction")
                guard !txn.ops.isEmpty, txn.ops.count <= 1000 else { throw APIError.badRequest("a transaction has 1 to 1000 operations") }
                var ops: [TransactionOp] = []
                for (i, op) in txn.ops.enumerated() {
                    if let error = Names.validate(op.path) { throw APIError.from(.transactionFailed(index: i, error)) }
                    var value = Array((op.value ?? "").utf8)
                    if let b64 = op.valueBase64 {
                        guard let data = Data(base64Encoded: b64) else { throw APIError.badRequest("operation \(i): value_base64 is not base64") }
                        value = Array(data)
                    }
                    switch op.op {
                    case "check":
                        guard let version = op.version else { throw APIError.badRequest("operation \(i): check needs a version") }
                        ops.append(.check(path: op.path, version: version))
                    case "create":
                        ops.append(.create(path: op.path, element: .record(value), session: op.session ?? 0, sequential: op.sequential ?? false))
                    case "put": ops.append(.put(path: op.path, value: value, session: op.session ?? 0))
                    case "delete": ops.append(.delete(path: op.path, version: op.version))
                    default: throw APIError.badRequest("operation \(i): unknown op \(op.op.debugDescription) (check, create, put, delete)")
                    }
                }
                return try await write(.transaction(ops), forward: true)
            }
        }
        router.get("/v1/ls") { request, context in try await list("/", request, context) }
        router.get("/v1/ls/**") { request, context in
            try await list("/" + context.parameters.getCatchAll().joined(separator: "/"), request, context)
        }
        router.post("/v1/sessions") { request, context in
            let request = try await Self.buffered(request)
            return try await leaderOr(request, context, stale: false, write: true) {
                let ttl = try query(request, "ttl_ms", as: UInt64.self) ?? 10_000
                guard (100...3_600_000).contains(ttl) else { throw APIError.badRequest("ttl_ms must be 100 to 3600000") }
                // The owner is who asks (its certificate's name, or its address without TLS), and the per-client
                // limit counts the sessions it holds. Without TLS a client may name itself with `?owner=`.
                let named = node.transport.configuration.tls == nil ? request.uri.queryParameters.get("owner").map { String($0) } : nil
                let owner = named ?? context.caller.name
                let limit = context.caller.isMember ? 0 : UInt32(clamping: node.config.maxSessionsPerClient)
                return try await write(.grantSession(owner: owner, ttlMillis: ttl, limit: limit), forward: true)
            }
        }
        router.post("/v1/sessions/:id/keepalive") { request, context in
            let id = try context.parameters.require("id", as: UInt64.self)
            return try await leaderOr(request, context, stale: false) {
                do {
                    guard try node.service.keepAlive(id) else { throw APIError.from(.noSuchSession(id)) }
                } catch let e as ControlServiceError {
                    throw APIError.from(e)
                }
                return try json(["session": id])
            }
        }
        router.delete("/v1/sessions/:id") { request, context in
            let id = try context.parameters.require("id", as: UInt64.self)
            // A client ends only its own sessions, unless its certificate is an admin's (or a member's). Checked where
            // the client asked: a member relaying the request has checked it.
            let caller = context.caller
            if !caller.mayActForOthers, !caller.isRelayed,
                let owner = node.service.state.read({ $0.sessions[id]?.owner }), owner != caller.name
            {
                throw APIError(
                    status: 403, code: "forbidden",
                    message: "session \(id) belongs to \(owner), not to \(caller.name): only its owner or an admin may end it")
            }
            let request = try await Self.buffered(request)
            return try await leaderOr(request, context, stale: false, write: true) {
                try await write(.endSession(id: id, expired: false), forward: true)
            }
        }
        router.post("/v1/hosts/register") { request, context in
            // Used by the daemons themselves: a host announces its addresses and gets a session.
            try await leaderOr(request, context, stale: false) {
                let view = try await decodeBody(request, as: HostView.self, what: "a host")
                let role: HostRole = view.role == "voter" ? .voter : view.role == "learner" ? .learner : .worker
                // A voter or learner removed from Raft may not know it yet: it does not come back by registering.
                if role != .worker, HostID.isValid(view.id),
                    !node.service.driver.status.membership.members.contains(HostID.nodeID(view.id))
                {
                    throw APIError(status: 409, code: "not_a_member", message: "\(view.id) is not in the Raft membership (it was removed): it cannot register as a \(view.role)")
                }
                let ttl = try query(request, "ttl_ms", as: UInt64.self) ?? 5000
                return try await write(
                    .registerHost(id: view.id, peerAddress: view.peerAddress, clientAddress: view.clientAddress, role: role, ttlMillis: ttl))
            }
        }
        router.post("/v1/cluster/members") { request, context in
            // A host joins as a learner: registered first (so every member learns its peer address), then added to
            // Raft's membership. A worker is registered only.
            try await leaderOr(request, context, stale: false) {
                let view = try await decodeBody(request, as: HostView.self, what: "a host")
                guard HostID.isValid(view.id) else { throw APIError.from(.invalidName(path: view.id, why: "a host id is X followed by 16 lowercase hex digits")) }
                guard view.role == "learner" || view.role == "worker" else {
                    throw APIError.badRequest("a host joins as a learner or a worker, not \(view.role.debugDescription)")
                }
                let role: HostRole = view.role == "worker" ? .worker : .learner
                let ttl = try query(request, "ttl_ms", as: UInt64.self) ?? 5000
                _ = try await write(
                    .registerHost(id: view.id, peerAddress: view.peerAddress, clientAddress: view.clientAddress, role: role, ttlMillis: ttl))
                node.syncPeers()
                if role == .learner, !node.service.driver.status.membership.members.contains(HostID.nodeID(view.id)) {
                    try await changeMembership(.addLearner(HostID.nodeID(view.id)))
                }
                // Members that have not registered yet are named too (state "unregistered"), with the peer address
                // this leader dials: a joining learner must reach every voter.
                var hosts = try await node.service.read { $0.hostList.map(HostView.init) }
                let membership = node.service.driver.status.membership
                for (id, address) in node.memberPeerAddresses().sorted(by: { $0.key < $1.key }) where !hosts.contains(where: { $0.id == id }) {
                    hosts.append(HostView(id: id, peerAddress: address, clientAddress: "", role: membership.isVoter(HostID.nodeID(id)) ? "voter" : "learner", state: "unregistered", session: 0, joinedAt: 0))
                }
                return try json(hosts)
            }
        }
        router.post("/v1/cluster/members/:id/promote") { request, context in
            let id = try hostParameter(context)
            return try await leaderOr(request, context, stale: false) {
                try await changeMembership(.promote(HostID.nodeID(id)))
                _ = try await write(.setHostRole(id: id, role: .voter))
                return try json(try await node.service.read { $0.hostList.map(HostView.init) })
            }
        }
        router.delete("/v1/cluster/members/:id") { request, context in
            let id = try hostParameter(context)
            return try await leaderOr(request, context, stale: false) {
                // Out of Raft first (so its own agent stops registering it), then out of the registry (its subtree
                // goes). A leader that removed itself has stepped down: the new leader records the departure.
                if node.service.driver.status.membership.members.contains(HostID.nodeID(id)) {
                    try await changeMembership(.remove(HostID.nodeID(id)))
                }
                let deadline = ContinuousClock.now + .seconds(10)
                while node.service.state.read({ $0.hosts[id]?.state == .alive }) {
                    let status = node.service.driver.status
                    if status.role == .leader {
                        _ = try await write(.leaveHost(id: id))
                    } else if status.leader != .none,
                        let address = node.service.state.read({ $0.hosts[HostID.string(status.leader)]?.clientAddress }),
                        let answer = try? await HTTPExchange.perform(.DELETE, "/v1/cluster/members/\(id)", to: address),
                        answer.status == 200
                    {
                        break
                    }
                    guard ContinuousClock.now < deadline else {
                        // Not no_leader, which says nothing was done: the removal from Raft was.
                        throw APIError(
                            status: 503, code: "departure_pending",
                            message: "removed from Raft; no leader recorded the departure in the membership yet: retry")
                    }
                    try await Task.sleep(for: .milliseconds(20))
                }
                return try json(node.service.state.read { $0.hostList.map(HostView.init) })
            }
        }
        router.post("/v1/cluster/leader") { request, context in
            try await leaderOr(request, context, stale: false) {
                let to = request.uri.queryParameters.get("to").map { String($0) }
                if let to, !HostID.isValid(to) { throw APIError.badRequest("\(to) is not a host id") }
                do {
                    let target = try await node.service.driver.transferLeadership(to: to.map(HostID.nodeID))
                    return try json(["to": HostID.string(target)])
                } catch {
                    throw APIError(status: 409, code: "transfer_refused", message: "\(error)")
                }
            }
        }
        router.put("/v1/proc-state/**") { request, context in
            // The owning host reports a process's new state; the command stays as it was created.
            let path = "/" + context.parameters.getCatchAll().joined(separator: "/")
            if let error = Names.validate(path) { throw APIError.from(error) }
            return try await leaderOr(request, context, stale: false) {
                let view = try await decodeBody(request, as: ProcStateView.self, what: "a process state")
                guard let phase = ["pending": ProcPhase.pending, "running": .running, "exited": .exited, "signaled": .signaled, "lost": .lost][view.phase] else {
                    throw APIError.badRequest("unknown phase \(view.phase.debugDescription) (pending, running, exited, signaled, lost)")
                }
                guard let (current, created) = node.service.state.read({ state -> (ProcState, UInt64)? in
                    guard let anchor = state.anchors[path], case .proc(let p)? = anchor.element else { return nil }
                    return (p, anchor.createRevision)
                }) else { throw APIError.from(.notFound(path: path)) }
                // About this element, and forward only: pending, then running, then an end.
                func rank(_ p: ProcPhase) -> Int { p == .pending ? 0 : p == .running ? 1 : 2 }
                if let about = view.createRevision, about != created {
                    throw APIError(status: 409, code: "stale_report", message: "\(path) is a newer element (created at revision \(created)) than the report is about (\(about))")
                }
                guard rank(phase) > rank(current.phase) else {
                    throw APIError(status: 409, code: "stale_report", message: "\(path) is \(current.phase) already; a report of \(phase) would move it back")
                }
                let command = current.command
                let answer = try await write(.updateProc(path: path, state: ProcState(
                    command: command, phase: phase, pid: view.pid, exitCode: view.exitCode, signal: view.signal,
                    startedAt: view.startedAt, endedAt: view.endedAt, attempts: view.attempts)))
                // A job's attempt ended (or started): its job may have ended.
                if path.dropFirst().contains("/jobs/") { node.jobsChanged.ring() }
                return answer
            }
        }
        router.get("/v1/wait/**") { request, context in
            // Served by this node from what it has applied: a process's end, once committed, stays.
            let path = "/" + context.parameters.getCatchAll().joined(separator: "/")
            if let error = Names.validate(path) { throw APIError.from(error) }
            return try await request.body.consumeWithCancellationOnInboundClose { _ in
                // The watch first, then the read: no change falls between them.
                let from = node.service.state.read { $0.revision }
                let stream: ReplicatedControlState.WatchStream
                do { stream = try node.service.watch(prefix: path, after: from) } catch {
                    throw APIError(status: 410, code: "compacted", message: "\(error)")
                }
                if let answer = try node.service.state.read({ try Self.ended(path, in: $0) }) { return try json(answer) }
                for try await event in stream where event.path == path {
                    if let answer = try node.service.state.read({ try Self.ended(path, in: $0) }) { return try json(answer) }
                }
                throw APIError(status: 503, code: "unavailable", message: "the node stopped before the process ended")
            }
        }
        router.post("/v1/signal/**") { request, context in
            let path = "/" + context.parameters.getCatchAll().joined(separator: "/")
            if let error = Names.validate(path) { throw APIError.from(error) }
            guard let owner = Names.host(of: path) else { throw APIError.badRequest("\(path) is not under a host: only a host's processes take signals") }
            if owner == node.folder.hostID {
                return try await Self.deliverSignal(path, request: request, runner: runner, ownHost: owner) {
                    try node.service.state.read { state in
                        guard let anchor = state.anchors[path] else { throw APIError.from(.notFound(path: path)) }
                        return ElementView(anchor: anchor, path: path)
                    }
                }
            }
            // Point to point: the owning host delivers it (once; it does not forward again).
            if request.headers[Self.forwardedHeader] != nil {
                throw APIError(status: 503, code: "wrong_host", message: "\(path) belongs to \(owner), not to this host")
            }
            guard let address = node.service.state.read({ $0.hosts[owner].flatMap { $0.state == .alive ? $0.clientAddress : nil } }) else {
                throw APIError.from(.hostNotAlive(owner))
            }
            return try await node.forward(request, for: context.caller, to: address)
        }
        router.get("/v1/watch") { request, _ in try watch("/", request) }
        router.get("/v1/watch/**") { request, context in
            try watch("/" + context.parameters.getCatchAll().joined(separator: "/"), request)
        }
        return router
    }

    // MARK: - Helpers

    /// A stream of JSON lines, one per change under `path` (`/`: everything) from `?from=` on; `?hosts=1`: only
    /// membership events.
    private func watch(_ path: String, _ request: Request) throws -> Response {
        let from = try query(request, "from", as: UInt64.self) ?? node.service.state.read { $0.revision + 1 }
        let hostsOnly = request.uri.queryParameters.get("hosts") == "1"
        let stream: ReplicatedControlState.WatchStream
        do {
            stream = try node.service.watch(prefix: path, after: from == 0 ? 0 : from - 1)
        } catch {
            throw APIError(status: 410, code: "compacted", message: "\(error)")
        }
        let body = ResponseBody { writer in
            do {
                // A client that hangs up ends the watch at once, even while no change comes to write.
                try await request.body.consumeWithCancellationOnInboundClose { _ in
                    for try await event in stream where !hostsOnly || event.kind.isHost {
                        try await writer.write(try ndjsonLine(EventView(event: event)))
                    }
                }
            } catch is CancellationError {
                return  // the client is gone: nothing to finish
            } catch let error as WatchError {
                try await writer.write(try ndjsonLine(ErrorEnvelope(APIError(status: 410, code: "compacted", message: error.description))))
            }
            try await writer.finish(nil)
        }
        return Response(status: .ok, headers: [.contentType: "application/x-ndjson"], body: body)
    }

    /// The process at `path` as a view once it has ended; nil while it runs; 404 if there is none.
    static func ended(_ path: String, in state: ControlState) throws -> ElementView? {
        guard let anchor = state.anchors[path], let element = anchor.element else { throw APIError.from(.notFound(path: path)) }
        switch element {
        case .proc(let p): guard p.phase == .exited || p.phase == .signaled || p.phase == .lost else { return nil }
        case .job(let j): guard j.ended else { return nil }
        default: throw APIError.from(.wrongKind(path: path, expected: "proc", actual: element.kind))
        }
        return ElementView(anchor: anchor, path: path)
    }

    /// Delivers `?signal=` to this host's process at `path` and answers the element as the cluster knows it.
    static func deliverSignal(
        _ path: String, request: Request, runner: ProcRunner, ownHost: String, current: () async throws -> ElementView
    ) async throws -> Response {
        let name = request.uri.queryParameters.get("signal").map { String($0) } ?? "TERM"
        guard let number = ProcRunner.signalNumber(name) else {
            throw APIError.badRequest("unknown signal \(name.debugDescription) (a name such as TERM, KILL, INT, HUP, or a number)")
        }
        let view = try await current()  // 404 if there is no such element
        guard view.kind == "proc" else { throw APIError.from(.wrongKind(path: path, expected: "proc", actual: view.kind)) }
        guard runner.signal(path, number, createRevision: view.createRevision) else {
            throw APIError(status: 409, code: "not_running", message: "no process of this host (\(ownHost)) is running at \(path)")
        }
        return try json(view)
    }

    /// Executes `command` and answers its result. `forward`: a client's command on a route that `leaderOr` runs on
    /// a follower too (`write: true`), which then hands it to the leader.
    private func write(_ command: Command, forward: Bool = false) async throws -> Response {
        let result: CommandResult
        do {
            result = try await node.service.execute(command, forward: forward)
        } catch {
            throw APIError.from(error)
        }
        switch result {
        case .ok(let revision, let path, let version, let session):
            return try json(WriteView(revision: revision, path: path, version: version, session: session))
        case .failed(let error):
            throw APIError.from(error)
        }
    }

    /// Proposes a membership change; while another is in flight (one at a time) or this leader has not committed
    /// an entry of its term yet, waits and retries for up to 10 s.
    private func changeMembership(_ change: ConfChange) async throws {
        let deadline = ContinuousClock.now + .seconds(10)
        while true {
            do {
                try await node.service.driver.changeMembership(change)
                return
            } catch RaftDriverError.refused(.notLeader(let leader)) {
                throw APIError.from(ControlServiceError.notLeader(leader: leader))
            } catch RaftDriverError.refused(.configChangeInProgress), RaftDriverError.refused(.leaderNotReady) {
                guard ContinuousClock.now < deadline else {
                    throw APIError(status: 503, code: "membership_busy", message: "another membership change is still in flight; retry")
                }
                try await Task.sleep(for: .milliseconds(20))
            } catch {
                throw APIError(status: 409, code: "membership_refused", message: "\(error)")
            }
        }
    }

    private func hostParameter(_ context: APIContext) throws -> String {
        let id = try context.parameters.require("id")
        guard HostID.isValid(id) else { throw APIError.badRequest("\(id) is not a host id (X and 16 lowercase hex digits)") }
        return id
    }

    /// `request` with its body read into memory (at most `maxBody`), so that it can be read again: by a route, and
    /// then by `forward` if the route could not serve it here.
    static func buffered(_ request: Request) async throws -> Request {
        var request = request
        _ = try await request.collectBody(upTo: maxBody)
        return request
    }

    /// The request's JSON body as a `T`, or a 400 naming what was expected and what was wrong.
    private func decodeBody<T: Decodable>(_ request: Request, as: T.Type, what: String) async throws -> T {
        var request = request
        let body = try await request.collectBody(upTo: Self.maxBody)
        if let problem = JSONLimits.depthProblem(body.readableBytesView) {
            throw APIError.badRequest("the body is not \(what): \(problem)")
        }
        do {
            return try JSONDecoder().decode(T.self, from: Data(buffer: body))
        } catch {
            throw APIError.badRequest("the body is not \(what): \(error)")
        }
    }

    /// `GET /v1/ls/PATH`: the names under `path`, or with `recursive` every path below it holding an element.
    private func list(_ path: String, _ request: Request, _ context: APIContext) async throws -> Response {
        let recursive = request.uri.queryParameters.get("recursive").map { $0 == "1" || $0 == "true" } ?? false
        return try await leaderOr(request, context, stale: isStale(request), read: true) {
            let names: [String] = try await node.service.read(consistency(request)) { state in
                recursive ? state.descendants(of: path) : state.children(of: path)
            }
            return try json(ListingView(path: path, names: names))
        }
    }

    private func isStale(_ request: Request) -> Bool { request.uri.queryParameters.get("consistency") == "stale" }

    private func consistency(_ request: Request) -> ReadConsistency { isStale(request) ? .stale : .linearizable }

    private func recordPath(_ context: APIContext) throws -> String {
        let path = Names.recordsRoot + "/" + context.parameters.getCatchAll().joined(separator: "/")
        if let error = Names.validate(path) { throw APIError.from(error) }
        return path
    }

    private func query<T: LosslessStringConvertible>(_ request: Request, _ name: String, as: T.Type) throws -> T? {
        guard let raw = request.uri.queryParameters.get(name) else { return nil }
        guard let value = T(String(raw)) else { throw APIError.badRequest("query parameter \(name)=\(raw) is not a number") }
        return value
    }

    /// Runs `body` here if this node leads (or the read may be stale); otherwise forwards the request to the leader.
    /// A linearizable `read` is served here too while a leader is known: this node asks the leader for a read index
    /// over the peer connection (one Raft message for all the reads waiting) and answers from its own state once it
    /// has applied that far. So is a `write` (a route whose work is one command): the command goes to the leader
    /// over the peer connection (`RaftDriver.propose` on a follower) and is answered once applied here. Only if
    /// that fails before the leader took it (the leader changed meanwhile) is the request forwarded.
    private func leaderOr(
        _ request: Request, _ context: APIContext, stale: Bool, read: Bool = false, write: Bool = false,
        _ body: () async throws -> Response
    ) async throws -> Response {
        let status = node.service.driver.status
        if stale || status.role == .leader { return try await body() }
        if read && status.leader != .none {
            do {
                return try await body()
            } catch let error as ControlServiceError {
                guard case .notLeader = error else { throw error }
            }
        }
        // A write of a command only: this node hands it to the leader over the peer connection and answers when it
        // has applied it. Forwarded as HTTP only if the leader certainly did not append it (`no_leader`); the body
        // was buffered (`buffered`) so that it can still be sent.
        if write && status.leader != .none {
            do {
                return try await body()
            } catch let error as APIError where error.code == "no_leader" {}
        }
        if request.headers[Self.forwardedHeader] != nil {
            throw APIError(status: 503, code: "no_leader", message: "this node is not the leader either (forwarded once already)")
        }
        guard status.leader != .none,
            let address = node.service.state.read({ $0.hosts[HostID.string(status.leader)]?.clientAddress })
        else {
            throw APIError(status: 503, code: "no_leader", message: "no leader is known yet; retry shortly")
        }
        return try await node.forward(request, for: context.caller, to: address)
    }
}

extension EventView {
    init(event e: WatchEvent) {
        let kind: String
        switch e.kind {
        case .put: kind = "put"
        case .delete: kind = "delete"
        case .hostJoined: kind = "host_joined"
        case .hostLeft: kind = "host_left"
        case .hostUpdated: kind = "host_updated"
        }
        var value: String?
        if case .record(let bytes)? = e.element { value = String(decoding: bytes, as: UTF8.self) }
        self.init(revision: e.revision, kind: kind, path: e.path, version: e.version, value: value)
    }
}

extension ElementView {
    init(anchor: Anchor, path: String? = nil) {
        self.init(kind: anchor.element?.kind ?? "none")
        self.path = path
        version = anchor.version
        createRevision = anchor.createRevision
        modRevision = anchor.modRevision
        session = anchor.session
        switch anchor.element {
        case .record(let bytes)?: value = String(decoding: bytes, as: UTF8.self)
        case .chan(let c)?: capacity = c
        case .proc(let p)?:
            command = ProcCommandView(path: p.command.path, args: p.command.args, env: p.command.env, dir: p.command.dir)
            phase = "\(p.phase)"
            pid = p.pid
            exitCode = p.exitCode
            signal = p.signal
            attempts = p.attempts
            startedAt = p.startedAt
            endedAt = p.endedAt
        case .select(let clauses)?: self.clauses = String(decoding: clauses, as: UTF8.self)
        case .subscription(let kind)?: events = kind == .join ? "join" : "leave"
        case .reserved(let kind)?: reserves = kind
        case .job(let j)?:
            command = ProcCommandView(path: j.command.path, args: j.command.args, env: j.command.env, dir: j.command.dir)
            phase = "\(j.phase)"
            attempts = j.attempts
            maxAttempts = j.maxAttempts
            host = j.host.isEmpty ? nil : j.host
            exitCode = j.exitCode
            signal = j.signal
        case nil: break
        }
    }
}

extension HostView {
    init(_ h: CircuitStateMachine.Host) {
        self.init(
            id: h.id, peerAddress: h.peerAddress, clientAddress: h.clientAddress, role: "\(h.role)", state: "\(h.state)",
            session: h.session, joinedAt: h.joinedAt)
    }
}

extension APIError: HTTPResponseError {
    public var status: HTTPResponse.Status { .init(code: statusCode) }
    public func response(from request: Request, context: some RequestContext) throws -> Response {
        let body = try JSONEncoder().encode(ErrorEnvelope(self))
        return Response(
            status: .init(code: statusCode), headers: [.contentType: "application/json"],
            body: .init(byteBuffer: ByteBuffer(bytes: body)))
    }
}

/// A read barrier that failed (a leader that lost its place mid-read, a driver stopping) answers as the API's
/// error for it (503 `no_leader`, `unavailable`...), wherever a route lets it through, not as a bare 500.
extension ControlServiceError: HTTPResponseError {
    public var status: HTTPResponse.Status { APIError.from(self).status }
    public func response(from request: Request, context: some RequestContext) throws -> Response {
        try APIError.from(self).response(from: request, context: context)
    }
}

/// One line of a streamed answer (a watch): `value` as JSON and a newline.
func ndjsonLine(_ value: some Encodable) throws -> ByteBuffer {
    var line = try JSONEncoder().encode(value)
    line.append(UInt8(ascii: "\n"))
    return ByteBuffer(bytes: line)
}

func json(_ value: some Encodable) throws -> Response {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    return jsonResponse(ByteBuffer(bytes: try encoder.encode(value)))
}

/// 200 with `body`, a JSON document.
func jsonResponse(_ body: ByteBuffer) -> Response {
    Response(status: .ok, headers: [.contentType: "application/json"], body: .init(byteBuffer: body))
}


