import CircuitRaft
import CircuitStateMachine
import Logging
import Synchronization

/// How fresh a read must be.
public enum ReadConsistency: String, Sendable, Codable {
    /// Sees every write acknowledged before the read began (ReadIndex: the leader confirms its leadership with a
    /// quorum, then waits until it has applied its commit index). The default.
    case linearizable
    /// What this node has applied, without asking anyone: may lag the leader. Served by any node, even one cut off.
    case stale
}

/// Why a request to the control state failed before the state machine answered.
public enum ControlServiceError: Error, Sendable, Hashable, CustomStringConvertible {
    /// This node is not the leader; retry at `leader` (nil: no leader is known yet).
    case notLeader(leader: NodeID?)
    /// The leader lost leadership before the command committed: it may or may not be applied.
    case outcomeUnknown
    /// Raft refused the proposal for another reason.
    case refused(String)
    /// The node is stopping or stopped.
    case unavailable(String)
    /// The answer could not be read (a bug, or a replica of another version).
    case badAnswer(String)

    public var description: String {
        switch self {
        case .notLeader(let leader?): return "this node is not the leader; the leader is \(leader)"
        case .notLeader(nil): return "this node is not the leader and no leader is known yet"
        case .outcomeUnknown: return "leadership changed before the command committed; it may or may not have been applied"
        case .refused(let why): return "refused: \(why)"
        case .unavailable(let why): return "unavailable: \(why)"
        case .badAnswer(let why): return "unreadable answer from the state machine: \(why)"
        }
    }

    init(_ error: any Error) {
        switch error {
        case let e as ControlServiceError: self = e
        case RaftDriverError.refused(.notLeader(let leader)): self = .notLeader(leader: leader)
        case RaftDriverError.refused(let why): self = .refused(why.description)
        case RaftDriverError.outcomeUnknown: self = .outcomeUnknown
        case let e as RaftDriverError: self = .unavailable(e.description)
        default: self = .unavailable("\(error)")
        }
    }
}

/// The replicated control state of one node: commands go through Raft, reads are linearizable unless asked
/// otherwise, watches stream the applied changes, and while this node leads it keeps the sessions' leases.
///
/// Only the leader executes commands and takes keep-alives; the others answer `notLeader` with the leader they
/// know, and the node's API forwards there. A linearizable read is served by any node that knows the leader (a
/// follower asks it for a read index). Stale reads and watches are served by
/// every node from what it has applied.
public final class ControlService: Sendable {
    public let driver: RaftDriver
    public let state: ReplicatedControlState
    private let logger: Logger
    /// Milliseconds on a monotonic clock (injected for tests).
    private let now: @Sendable () -> UInt64
    private let leases = Mutex(Leases())

    private struct Leases {
        var keeper = LeaseKeeper()
        /// The term in which this node last took over the leases (nil while it is not leader).
        var leaderTerm: UInt64?
    }

    public init(
        driver: RaftDriver, state: ReplicatedControlState, logger: Logger,
        now: @escaping @Sendable () -> UInt64 = ControlService.monotonicMilliseconds
    ) {
        self.driver = driver
        self.state = state
        self.logger = logger
        self.now = now
    }

    private static let origin = ContinuousClock.now

    /// Milliseconds since this process first asked, on the monotonic clock.
    public static let monotonicMilliseconds: @Sendable () -> UInt64 = {
        let d = ContinuousClock.now - origin
        return UInt64(d.components.seconds) * 1000 + UInt64(d.components.attoseconds / 1_000_000_000_000_000)
    }

    // MARK: - Commands and reads

    /// Proposes `command`; returns its result once it is committed and applied here. Only on the leader, unless
    /// `forward` (a client's command): then a follower hands it to the leader and answers once it has applied it.
    /// What only the leader may decide (a lease's expiry, a job's placement) is never forwarded: a deposed leader's
    /// decision must not be committed by the next one.
    public func execute(_ command: Command, forward: Bool = false) async throws(ControlServiceError) -> CommandResult {
        let answer: [UInt8]
        do {
            answer = try await driver.propose(command.encoded, forward: forward)
        } catch {
            throw ControlServiceError(error)
        }
        do {
            return try CommandResult(decoding: answer)
        } catch {
            throw .badAnswer(error.description)
        }
    }

    /// Runs `body` on the state, after a ReadIndex barrier unless `consistency` is `.stale`.
    public func read<T: Sendable>(
        _ consistency: ReadConsistency = .linearizable, _ body: (ControlState) throws -> T
    ) async throws -> T {
        if consistency == .linearizable {
            do {
                _ = try await driver.readBarrier()
            } catch {
                throw ControlServiceError(error)
            }
        }
        return try state.read(body)
    }

    /// Changes after `revision` under `prefix`, then new ones as they are applied here.
    public func watch(prefix: String, after revision: Revision) throws(WatchError) -> ReplicatedControlState.WatchStream {
        try state.watch(prefix: prefix, after: revision)
    }

    // MARK: - Sessions

    /// A keep-alive for `session`. Only the leader keeps leases; false if the session is not known (ended, expired
    /// or never granted).
    public func keepAlive(_ session: SessionID) throws(ControlServiceError) -> Bool {
        let status = driver.status
        guard status.role == .leader else { throw .notLeader(leader: status.leader == .none ? nil : status.leader) }
        let term = status.term
        let known = state.read { $0.sessions[session] }
        let at = now()
        return leases.withLock { leases in
            if leases.leaderTerm != term { Self.takeOver(&leases, term: term, state: state, now: at) }
            guard let known else {
                leases.keeper.forget(session)
                return false
            }
            if !leases.keeper.tracks(session) {
                leases.keeper.track(session, ttl: known.ttlMillis, now: at)
                return true
            }
            return leases.keeper.keepAlive(session, now: at)
        }
    }

    /// One turn of the lease keeping: while leader, track the sessions the state holds (a new leader gives each a
    /// full TTL from the moment it took over) and propose the end of every session whose lease ran out. Returns how
    /// many expiries were proposed. The daemon calls this a few times per second.
    @discardableResult
    public func expireLeases() async -> Int {
        let status = driver.status
        guard status.role == .leader else {
            leases.withLock { $0.leaderTerm = nil }
            return 0
        }
        let at = now()
        let expired: [SessionID] = leases.withLock { leases in
            Self.takeOver(&leases, term: status.term, state: state, now: at)
            return leases.keeper.expired(now: at)
        }
        var proposed = 0
        for id in expired {
            do {
                _ = try await execute(.endSession(id: id, expired: true))
                proposed += 1
                logger.info("session expired", metadata: ["session": "\(id)"])
            } catch {
                logger.debug("could not propose a session's expiry", metadata: ["session": "\(id)", "error": "\(error)"])
            }
            leases.withLock { $0.keeper.forget(id) }
        }
        return proposed
    }

    /// Brings the keeper in line with the state: after a change of leader every session gets a full TTL; sessions
    /// granted since are tracked from now, ended ones forgotten.
    private static func takeOver(_ leases: inout Leases, term: UInt64, state: ReplicatedControlState, now: UInt64) {
        let sessions = state.read { Array($0.sessions.values) }
        if leases.leaderTerm != term {
            leases.keeper.becameLeader(sessions: sessions, now: now)
            leases.leaderTerm = term
            return
        }
        let live = Set(sessions.map(\.id))
        for s in sessions where !leases.keeper.tracks(s.id) { leases.keeper.track(s.id, ttl: s.ttlMillis, now: now) }
        for id in leases.keeper.tracked where !live.contains(id) { leases.keeper.forget(id) }
    }
}
