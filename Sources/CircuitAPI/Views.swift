/// The wire types of the HTTP/JSON API (docs/http-api.md), shared by the daemon and the client library.

/// One error format everywhere: an HTTP status, a machine-readable code and a sentence a person understands.
/// On the wire: `{"error": {"code": ..., "message": ...}}` with the status as the HTTP status.
public struct APIError: Error, Sendable, Equatable, CustomStringConvertible {
    public var statusCode: Int
    public var code: String
    public var message: String

    public init(status: Int, code: String, message: String) {
        self.statusCode = status
        self.code = code
        self.message = message
    }

    public static func badRequest(_ message: String) -> APIError { APIError(status: 400, code: "bad_request", message: message) }

    public var description: String { message }
}

/// The body of an error answer.
public struct ErrorEnvelope: Codable, Sendable, Equatable {
    public struct Body: Codable, Sendable, Equatable {
        public var code: String
        public var message: String
    }
    public var error: Body

    public init(_ e: APIError) { error = Body(code: e.code, message: e.message) }
}

/// The end of a stream that failed after its answer's status (200) went out, written inside its body (for a stream of
/// receives, after `MessageFrameReader.failureMark`): `{"status": 410, "error": {"code": ..., "message": ...}}`.
public struct StreamFailure: Codable, Sendable, Equatable {
    public var status: Int
    public var error: ErrorEnvelope.Body

    public init(_ e: APIError) {
        status = e.statusCode
        error = ErrorEnvelope.Body(code: e.code, message: e.message)
    }

    public var apiError: APIError { APIError(status: status, code: error.code, message: error.message) }
}

/// A record as the API shows it.
public struct RecordView: Codable, Sendable, Equatable {
    public var path: String
    /// The value as UTF-8 text (invalid sequences replaced); `valueBase64` has the exact bytes.
    public var value: String
    public var valueBase64: String
    public var version: UInt64
    public var createRevision: UInt64
    public var modRevision: UInt64
    /// The session it is tied to (0: durable).
    public var session: UInt64
    /// The cluster's revision when this was read.
    public var revision: UInt64

    public init(
        path: String, value: String, valueBase64: String, version: UInt64, createRevision: UInt64, modRevision: UInt64,
        session: UInt64, revision: UInt64
    ) {
        self.path = path
        self.value = value
        self.valueBase64 = valueBase64
        self.version = version
        self.createRevision = createRevision
        self.modRevision = modRevision
        self.session = session
        self.revision = revision
    }

    public enum CodingKeys: String, CodingKey {
        case path, value, version, session, revision
        case valueBase64 = "value_base64"
        case createRevision = "create_revision"
        case modRevision = "mod_revision"
    }
}

/// What a write did: the revision it made, the path it wrote (a sequential create's full name), the element's new
/// version, and for a session grant or a host registration the session.
public struct WriteView: Codable, Sendable, Equatable {
    public var revision: UInt64
    public var path: String?
    public var version: UInt64
    public var session: UInt64

    public init(revision: UInt64, path: String?, version: UInt64, session: UInt64) {
        self.revision = revision
        self.path = path
        self.version = version
        self.session = session
    }
}

/// One node's view of itself and the cluster.
public struct StatusView: Codable, Sendable, Equatable {
    public var host: String
    public var cluster: String
    /// leader, follower, candidate, preCandidate
    public var role: String
    public var term: UInt64
    public var leader: String?
    public var commitIndex: UInt64
    public var appliedIndex: UInt64
    public var revision: UInt64
    public var voters: [String]
    public var learners: [String]
    /// Watches open on this node (absent from a worker, which holds none of its own).
    public var watches: Int?
    /// How this node's ports are protected: "mutual TLS", "plaintext on loopback", or "INSECURE: plaintext beyond
    /// loopback" (started with --insecure).
    public var security: String?

    public init(
        host: String, cluster: String, role: String, term: UInt64, leader: String?, commitIndex: UInt64,
        appliedIndex: UInt64, revision: UInt64, voters: [String], learners: [String], watches: Int? = nil,
        security: String? = nil
    ) {
        self.watches = watches
        self.security = security
        self.host = host
        self.cluster = cluster
        self.role = role
        self.term = term
        self.leader = leader
        self.commitIndex = commitIndex
        self.appliedIndex = appliedIndex
        self.revision = revision
        self.voters = voters
        self.learners = learners
    }

    public enum CodingKeys: String, CodingKey {
        case host, cluster, role, term, leader, revision, voters, learners, watches, security
        case commitIndex = "commit_index"
        case appliedIndex = "applied_index"
    }
}

/// A host of the membership.
public struct HostView: Codable, Sendable, Equatable {
    public var id: String
    public var peerAddress: String
    public var clientAddress: String
    /// voter, learner, worker
    public var role: String
    /// alive, left, expired
    public var state: String
    public var session: UInt64
    public var joinedAt: UInt64

    public init(
        id: String, peerAddress: String, clientAddress: String, role: String, state: String, session: UInt64,
        joinedAt: UInt64
    ) {
        self.id = id
        self.peerAddress = peerAddress
        self.clientAddress = clientAddress
        self.role = role
        self.state = state
        self.session = session
        self.joinedAt = joinedAt
    }

    public enum CodingKeys: String, CodingKey {
        case id, role, state, session
        case peerAddress = "peer_address"
        case clientAddress = "client_address"
        case joinedAt = "joined_at"
    }
}

/// The names under a path.
public struct ListingView: Codable, Sendable, Equatable {
    public var path: String
    public var names: [String]

    public init(path: String, names: [String]) {
        self.path = path
        self.names = names
    }
}

/// A change, as a watch streams it (one JSON object per line).
public struct EventView: Codable, Sendable, Equatable {
    public var revision: UInt64
    /// put, delete, host_joined, host_left
    public var kind: String
    public var path: String
    public var version: UInt64
    /// A record's new value as UTF-8 text.
    public var value: String?

    public init(revision: UInt64, kind: String, path: String, version: UInt64, value: String?) {
        self.revision = revision
        self.kind = kind
        self.path = path
        self.version = version
        self.value = value
    }
}

/// One operation of a transaction (`POST /v1/txn`): all apply, in order, as one revision, or none does.
public struct TransactionOpView: Codable, Sendable, Equatable {
    /// check, create, put, delete
    public var op: String
    /// A full path under /records.
    public var path: String
    /// check: the version the record must be at (0: absent); delete: only at this version.
    public var version: UInt64?
    /// create, put: the value as text (or `valueBase64` for exact bytes).
    public var value: String?
    public var valueBase64: String?
    /// create, put: tie the record to a session.
    public var session: UInt64?
    /// create: append the parent's next sequence number to the name.
    public var sequential: Bool?

    public init(
        op: String, path: String, version: UInt64? = nil, value: String? = nil, valueBase64: String? = nil,
        session: UInt64? = nil, sequential: Bool? = nil
    ) {
        self.op = op
        self.path = path
        self.version = version
        self.value = value
        self.valueBase64 = valueBase64
        self.session = session
        self.sequential = sequential
    }

    public static func check(_ path: String, version: UInt64) -> Self { .init(op: "check", path: path, version: version) }
    public static func put(_ path: String, _ value: String, session: UInt64? = nil) -> Self {
        .init(op: "put", path: path, value: value, session: session)
    }
    public static func create(_ path: String, _ value: String, sequential: Bool = false) -> Self {
        .init(op: "create", path: path, value: value, sequential: sequential)
    }
    public static func delete(_ path: String, version: UInt64? = nil) -> Self { .init(op: "delete", path: path, version: version) }

    public enum CodingKeys: String, CodingKey {
        case op, path, version, value, session, sequential
        case valueBase64 = "value_base64"
    }
}

public struct TransactionView: Codable, Sendable, Equatable {
    public var ops: [TransactionOpView]
    public init(ops: [TransactionOpView]) { self.ops = ops }
}

/// What an anchor of the namespace holds (`GET /v1/peek/PATH`), and how to create an element
/// (`PUT /v1/namespace/PATH`: `kind` and the fields of that kind).
public struct ElementView: Codable, Sendable, Equatable {
    public var path: String?
    /// chan, proc, job, select, subscription, record, reserved, or none (an anchor with children only)
    public var kind: String
    public var version: UInt64?
    public var createRevision: UInt64?
    public var modRevision: UInt64?
    public var session: UInt64?
    /// chan: its capacity.
    public var capacity: UInt32?
    /// record: the value as text.
    public var value: String?
    /// proc: the command, as in the slides' `run` file.
    public var command: ProcCommandView?
    /// proc: pending, running, exited, signaled, lost.
    public var phase: String?
    public var pid: Int64?
    public var exitCode: Int32?
    public var signal: Int32?
    public var attempts: UInt32?
    /// proc: milliseconds since the epoch, on the owning host's clock (0: not yet).
    public var startedAt: UInt64?
    public var endedAt: UInt64?
    /// job: how many placements it may have (default 3); the host of its current or last attempt.
    public var maxAttempts: UInt32?
    public var host: String?
    /// select: the clauses as JSON text.
    public var clauses: String?
    /// subscription: join or leave.
    public var events: String?
    /// reserved: the kind the name is taken for (proc, chan or select), until that element is created there.
    public var reserves: String?
    /// The names of the anchor's children.
    public var children: [String]?

    public init(kind: String) { self.kind = kind }

    public enum CodingKeys: String, CodingKey {
        case path, kind, version, session, capacity, value, command, phase, pid, signal, attempts, clauses, events, children, host
        case reserves
        case maxAttempts = "max_attempts"
        case startedAt = "started_at"
        case endedAt = "ended_at"
        case createRevision = "create_revision"
        case modRevision = "mod_revision"
        case exitCode = "exit_code"
    }
}

/// A process's command: `{"path": "/bin/ls", "args": [...], "env": [...], "dir": "..."}`.
public struct ProcCommandView: Codable, Sendable, Equatable {
    public var path: String
    public var args: [String]?
    public var env: [String]?
    public var dir: String?

    public init(path: String, args: [String]? = nil, env: [String]? = nil, dir: String? = nil) {
        self.path = path
        self.args = args
        self.env = env
        self.dir = dir
    }
}

/// A process's new state, as its owning host reports it (`PUT /v1/proc-state/PATH`).
public struct ProcStateView: Codable, Sendable, Equatable {
    /// pending, running, exited, signaled, lost
    public var phase: String
    public var pid: Int64
    public var exitCode: Int32
    public var signal: Int32
    /// Milliseconds since the epoch, on the owning host's clock.
    public var startedAt: UInt64
    public var endedAt: UInt64
    public var attempts: UInt32
    /// The element this report is about (its create revision): a report about an earlier element at the same path
    /// is refused.
    public var createRevision: UInt64?

    public init(
        phase: String, pid: Int64 = 0, exitCode: Int32 = 0, signal: Int32 = 0, startedAt: UInt64 = 0, endedAt: UInt64 = 0,
        attempts: UInt32 = 0, createRevision: UInt64? = nil
    ) {
        self.createRevision = createRevision
        self.phase = phase
        self.pid = pid
        self.exitCode = exitCode
        self.signal = signal
        self.startedAt = startedAt
        self.endedAt = endedAt
        self.attempts = attempts
    }

    public enum CodingKeys: String, CodingKey {
        case phase, pid, signal, attempts
        case exitCode = "exit_code"
        case startedAt = "started_at"
        case endedAt = "ended_at"
        case createRevision = "create_revision"
    }
}

/// A channel as its owning host holds it: `GET /v1/chan/stat/PATH`, and the answer to send and close.
public struct ChanStatView: Codable, Sendable, Equatable {
    public var path: String
    public var capacity: Int
    public var closed: Bool
    /// Messages in the buffer.
    public var buffered: Int
    /// Sends completed and messages received, since this host took the channel.
    public var sends: UInt64
    public var receives: UInt64
    public var waitingSenders: Int
    public var waitingReceivers: Int

    public init(
        path: String, capacity: Int, closed: Bool, buffered: Int, sends: UInt64, receives: UInt64, waitingSenders: Int,
        waitingReceivers: Int
    ) {
        self.path = path
        self.capacity = capacity
        self.closed = closed
        self.buffered = buffered
        self.sends = sends
        self.receives = receives
        self.waitingSenders = waitingSenders
        self.waitingReceivers = waitingReceivers
    }

    public enum CodingKeys: String, CodingKey {
        case path, capacity, closed, buffered, sends, receives
        case waitingSenders = "waiting_senders"
        case waitingReceivers = "waiting_receivers"
    }
}

/// The answer to `POST /v1/proc/stdin/PATH`.
public struct StdinView: Codable, Sendable, Equatable {
    public var path: String
    /// Bytes written into the process's stdin.
    public var bytes: Int
    /// Whether stdin was closed after them.
    public var closed: Bool

    public init(path: String, bytes: Int, closed: Bool) {
        self.path = path
        self.bytes = bytes
        self.closed = closed
    }
}

/// One clause of a select, as written in its element (`clauses`, a JSON array of these).
public struct SelectClauseView: Codable, Sendable, Equatable {
    /// recv, send, wait (a process's end) or default
    public var op: String
    /// recv and send: the channel, `/X<host>/...`.
    public var chan: String?
    /// recv and send, optional: the create revision of the channel meant (as `?created=` of the channel calls). A
    /// channel at the path made after it means the one meant was removed: the clause fires with an error.
    public var created: UInt64?
    /// send: the message as text, or exactly as `message_base64`.
    public var message: String?
    public var messageBase64: String?
    /// wait: the process (or job).
    public var proc: String?

    public init(
        op: String, chan: String? = nil, created: UInt64? = nil, message: String? = nil, messageBase64: String? = nil, proc: String? = nil
    ) {
        self.op = op
        self.chan = chan
        self.created = created
        self.message = message
        self.messageBase64 = messageBase64
        self.proc = proc
    }

    public enum CodingKeys: String, CodingKey {
        case op, chan, created, message, proc
        case messageBase64 = "message_base64"
    }
}

/// What a select's wait answers: the clause that fired, and what it brought.
public struct SelectOutcomeView: Codable, Sendable, Equatable {
    public var clause: Int
    public var op: String
    public var chan: String?
    /// recv: the message received, as text and exactly.
    public var message: String?
    public var messageBase64: String?
    /// recv: the channel was closed and empty (no message).
    public var closed: Bool?
    /// The clause failed rather than fired: why (a send on a closed channel, a channel removed, a host gone).
    public var error: String?
    /// wait: the process's final state.
    public var proc: ElementView?

    public init(clause: Int, op: String) {
        self.clause = clause
        self.op = op
    }

    public enum CodingKeys: String, CodingKey {
        case clause, op, chan, message, closed, error, proc
        case messageBase64 = "message_base64"
    }
}

/// Facts about one host and its daemon (`GET /v1/sys`), as the mount's `sys/` files show them.
public struct SysView: Codable, Sendable, Equatable {
    public var host: String
    /// leader, follower, candidate, preCandidate, or worker.
    public var role: String
    public var term: UInt64
    public var leader: String?
    public var cpus: Int
    public var memoryBytes: UInt64
    public var memoryAvailableBytes: UInt64
    /// The load averages over 1, 5 and 15 minutes.
    public var load: [Double]
    /// The daemon's process id and how long it has run.
    public var pid: Int32
    public var uptimeSeconds: Double

    public init(
        host: String, role: String, term: UInt64, leader: String?, cpus: Int, memoryBytes: UInt64,
        memoryAvailableBytes: UInt64, load: [Double], pid: Int32, uptimeSeconds: Double
    ) {
        self.host = host
        self.role = role
        self.term = term
        self.leader = leader
        self.cpus = cpus
        self.memoryBytes = memoryBytes
        self.memoryAvailableBytes = memoryAvailableBytes
        self.load = load
        self.pid = pid
        self.uptimeSeconds = uptimeSeconds
    }

    public enum CodingKeys: String, CodingKey {
        case host, role, term, leader, cpus, load, pid
        case memoryBytes = "memory_bytes"
        case memoryAvailableBytes = "memory_available_bytes"
        case uptimeSeconds = "uptime_seconds"
    }
}

/// A join token (`POST /v1/tokens`): its text, a secret to hand to the joining host, and when it expires.
public struct TokenView: Codable, Sendable, Equatable {
    public var token: String
    /// Seconds since 1970.
    public var expires: Int64

    public init(token: String, expires: Int64) {
        self.token = token
        self.expires = expires
    }
}

/// What a joining host sends to `POST /v1/join/certificate`: its join token and a PKCS#10 request (PEM) for its host
/// id, signed with the key it keeps.
public struct JoinCertificateRequestView: Codable, Sendable, Equatable {
    public var token: String
    public var csr: String

    public init(token: String, csr: String) {
        self.token = token
        self.csr = csr
    }
}

/// The answer to `POST /v1/join/certificate`: the host's new certificate and the cluster's CA certificate (PEM).
public struct JoinCertificateView: Codable, Sendable, Equatable {
    public var certificate: String
    public var ca: String

    public init(certificate: String, ca: String) {
        self.certificate = certificate
        self.ca = ca
    }
}
