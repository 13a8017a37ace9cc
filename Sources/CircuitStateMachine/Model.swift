/// The control state's revision: raised by one for every change (a transaction is one change).
public typealias Revision = UInt64
/// A session's id: the Raft index of the entry that granted it, so every replica picks the same one.
public typealias SessionID = UInt64

/// What a host is in the Raft group.
public enum HostRole: UInt8, Sendable, Hashable, Codable {
    case voter = 1, learner = 2, worker = 3
}

/// Where a host is in its life.
public enum HostState: UInt8, Sendable, Hashable, Codable {
    /// Registered, with a live session.
    case alive = 1
    /// Left on its own (graceful shutdown).
    case left = 2
    /// Its session expired: it was not heard from for its TTL.
    case expired = 3
}

/// A member host.
public struct Host: Sendable, Hashable {
    /// `X` + 16 lowercase hex digits, chosen once by the host.
    public var id: String
    public var peerAddress: String
    public var clientAddress: String
    public var role: HostRole
    public var session: SessionID
    /// The revision at which it (last) joined.
    public var joinedAt: Revision
    public var state: HostState

    public init(
        id: String, peerAddress: String, clientAddress: String, role: HostRole, session: SessionID = 0,
        joinedAt: Revision = 0, state: HostState = .alive
    ) {
        self.id = id
        self.peerAddress = peerAddress
        self.clientAddress = clientAddress
        self.role = role
        self.session = session
        self.joinedAt = joinedAt
        self.state = state
    }
}

/// A lease: while its owner keeps it alive (with the leader, not through the log), what it owns lives.
public struct Session: Sendable, Hashable {
    public var id: SessionID
    public var ttlMillis: UInt64
    /// A host id, or a client's name.
    public var owner: String
    public var createdAt: Revision
}

/// A process's life-cycle phase.
public enum ProcPhase: UInt8, Sendable, Hashable, Codable {
    case pending = 1, running = 2, exited = 3, signaled = 4, lost = 5
}

/// What to run: the slides' `run` format.
public struct ProcCommand: Sendable, Hashable, Codable {
    public var path: String
    public var args: [String]
    public var env: [String]
    public var dir: String

    public init(path: String, args: [String] = [], env: [String] = [], dir: String = "") {
        self.path = path
        self.args = args
        self.env = env
        self.dir = dir
    }
}

/// A process element's state as the cluster knows it.
public struct ProcState: Sendable, Hashable {
    public var command: ProcCommand
    public var phase: ProcPhase
    public var pid: Int64
    public var exitCode: Int32
    public var signal: Int32
    /// Milliseconds since the epoch, assigned by whoever proposed the change (never read from a replica's clock).
    public var startedAt: UInt64
    public var endedAt: UInt64
    public var attempts: UInt32

    public init(
        command: ProcCommand, phase: ProcPhase = .pending, pid: Int64 = 0, exitCode: Int32 = 0, signal: Int32 = 0,
        startedAt: UInt64 = 0, endedAt: UInt64 = 0, attempts: UInt32 = 0
    ) {
        self.command = command
        self.phase = phase
        self.pid = pid
        self.exitCode = exitCode
        self.signal = signal
        self.startedAt = startedAt
        self.endedAt = endedAt
        self.attempts = attempts
    }
}

/// Where a fault-tolerant job is in its life.
public enum JobPhase: UInt8, Sendable, Hashable, Codable {
    /// Not placed yet (or its host was lost and it waits for another).
    case pending = 1
    /// Its current attempt is a process on `host`.
    case placed = 2
    /// An attempt ended: the job is done.
    case exited = 3, signaled = 4
    /// Every attempt's host was lost.
    case failed = 5
}

/// A job: a process the leader places on a live host, and places again on another if that host is lost before the
/// process ends, up to `maxAttempts` times (at least once).
public struct JobState: Sendable, Hashable {
    public var command: ProcCommand
    public var maxAttempts: UInt32
    public var phase: JobPhase
    /// Placements so far.
    public var attempts: UInt32
    /// The host of the current (or last) attempt; empty before the first.
    public var host: String
    public var exitCode: Int32
    public var signal: Int32

    public init(
        command: ProcCommand, maxAttempts: UInt32 = 3, phase: JobPhase = .pending, attempts: UInt32 = 0, host: String = "",
        exitCode: Int32 = 0, signal: Int32 = 0
    ) {
        self.command = command
        self.maxAttempts = maxAttempts
        self.phase = phase
        self.attempts = attempts
        self.host = host
        self.exitCode = exitCode
        self.signal = signal
    }

    public var ended: Bool { phase == .exited || phase == .signaled || phase == .failed }
}

/// Which membership events a subscription reports.
public enum SubscriptionKind: UInt8, Sendable, Hashable, Codable {
    case join = 1, leave = 2
}

/// What an anchor holds.
public enum Element: Sendable, Hashable {
    case chan(capacity: UInt32)
    /// Boxed: keeps every other element, and every anchor, small.
    indirect case proc(ProcState)
    /// The clauses as the client wrote them (JSON); the owning host interprets them.
    case select(clauses: [UInt8])
    case subscription(SubscriptionKind)
    case record([UInt8])
    /// Boxed, as a process is.
    indirect case job(JobState)
    /// A name taken for an element of this kind (proc, chan or select) that is not made yet: what the file system's
    /// `mkdir` creates. Creating that kind at the name replaces it; nothing runs or holds a buffer for it. Boxed, so
    /// that every element stays the size of a pointer and a tag.
    indirect case reserved(String)

    /// The kinds a reservation may be for.
    public static let reservable: Set<String> = ["proc", "chan", "select"]

    public var kind: String {
        switch self {
        case .chan: return "chan"
        case .proc: return "proc"
        case .select: return "select"
        case .subscription: return "subscription"
        case .record: return "record"
        case .job: return "job"
        case .reserved: return "reserved"
        }
    }
}

/// An anchor of the namespace: at most one element, any number of children.
public struct Anchor: Sendable, Hashable {
    public var element: Element?
    /// Raised by one at every change of the element (0 while there is none).
    public var version: UInt64
    public var createRevision: Revision
    public var modRevision: Revision
    /// The session the element is tied to (ephemeral), or 0 (durable).
    public var session: SessionID

    public init(
        element: Element? = nil, version: UInt64 = 0, createRevision: Revision = 0, modRevision: Revision = 0,
        session: SessionID = 0
    ) {
        self.element = element
        self.version = version
        self.createRevision = createRevision
        self.modRevision = modRevision
        self.session = session
    }
}

/// One change, as watchers see it.
public struct WatchEvent: Sendable, Hashable {
    public enum Kind: UInt8, Sendable, Hashable {
        /// An element was created or changed.
        case put = 1
        /// An element was removed.
        case delete = 2
        case hostJoined = 3
        case hostLeft = 4
        /// A live host's role changed (a learner promoted, a voter demoted).
        case hostUpdated = 5

        /// A membership event (a host joined, left or changed role).
        public var isHost: Bool { self == .hostJoined || self == .hostLeft || self == .hostUpdated }
    }
    public var revision: Revision
    public var kind: Kind
    public var path: String
    /// The element's version after the change (0 for a delete).
    public var version: UInt64
    /// The element after the change (nil for a delete and host events).
    public var element: Element?
}
