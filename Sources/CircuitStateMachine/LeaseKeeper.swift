/// What the leader keeps of sessions' keep-alives, in memory only (as etcd does with leases): a keep-alive costs no
/// log entry. Time is injected (milliseconds on a monotonic clock). When a node becomes leader it gives every session
/// a full TTL from that moment before expiring any, since keep-alives sent to the old leader were not seen here.
public struct LeaseKeeper: Sendable, Hashable {
    private var deadlines: [SessionID: UInt64] = [:]
    private var ttls: [SessionID: UInt64] = [:]

    public init() {}

    /// This node became leader at `now`, with these sessions in the state: each gets a full TTL from now.
    public mutating func becameLeader(sessions: [Session], now: UInt64) {
        deadlines = [:]
        ttls = [:]
        for s in sessions { track(s.id, ttl: s.ttlMillis, now: now) }
    }

    /// A session granted (or seen applied) at `now`.
    public mutating func track(_ id: SessionID, ttl: UInt64, now: UInt64) {
        ttls[id] = ttl
        deadlines[id] = now + ttl
    }

    /// A keep-alive from the session's owner. False if the session is unknown (ended, or never granted).
    @discardableResult
    public mutating func keepAlive(_ id: SessionID, now: UInt64) -> Bool {
        guard let ttl = ttls[id] else { return false }
        deadlines[id] = max(deadlines[id] ?? 0, now + ttl)
        return true
    }

    /// A session ended (its `endSession` was applied).
    public mutating func forget(_ id: SessionID) {
        deadlines[id] = nil
        ttls[id] = nil
    }

    /// Sessions whose deadline has passed at `now`, oldest deadline first: the leader proposes `endSession` for each.
    public func expired(now: UInt64) -> [SessionID] {
        deadlines.filter { $0.value <= now }.sorted { ($0.value, $0.key) < ($1.value, $1.key) }.map(\.key)
    }

    /// Whether `id` is tracked.
    public func tracks(_ id: SessionID) -> Bool { ttls[id] != nil }

    /// Every tracked session.
    public var tracked: [SessionID] { Array(ttls.keys) }

    /// When the next session expires, if any: the leader's timer.
    public var nextDeadline: UInt64? { deadlines.values.min() }
}
