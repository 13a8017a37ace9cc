/// The leader's rule for keeping 3 or 5 voters when a voter is lost for long: a pure value, fed the membership and
/// the time, answering what to change next.
///
/// A voter is lost when its host is not alive in the registry (its session expired, or it left). Once one has been
/// lost for `lostAfter` milliseconds (as this leader saw it: a new leader starts its clocks afresh):
/// - with an odd number of voters, a live learner is promoted (Raft refuses one that lags; the next is tried);
/// - with an even number, the lost voter is removed.
/// So 3 voters with one lost become 4 and then 3 again, never fewer than before; without a live learner nothing
/// changes. Promoting before removing keeps the number of live voters from ever dropping.
struct VoterKeeper: Sendable, Equatable {
    enum Action: Sendable, Equatable {
        /// Promote the first of these learners that Raft accepts (they are alive; the order is the try order).
        case promote(candidates: [String], replacing: String)
        case remove(String)
    }

    /// Milliseconds a voter may be lost before it is replaced; 0 turns the rule off.
    let lostAfter: UInt64
    /// Voters seen lost, and since when.
    private(set) var lostSince: [String: UInt64] = [:]

    init(lostAfter: UInt64) { self.lostAfter = lostAfter }

    /// One look at the membership at time `now` (milliseconds, monotonic).
    mutating func decide(now: UInt64, voters: Set<String>, learners: Set<String>, alive: Set<String>) -> Action? {
        guard lostAfter > 0 else { return nil }
        for v in voters where !alive.contains(v) && lostSince[v] == nil { lostSince[v] = now }
        lostSince = lostSince.filter { voters.contains($0.key) && !alive.contains($0.key) }
        guard let victim = lostSince.filter({ now >= $0.value + lostAfter }).keys.sorted().first else { return nil }
        if voters.count % 2 == 0 { return .remove(victim) }
        let candidates = learners.filter(alive.contains).sorted()
        return candidates.isEmpty ? nil : .promote(candidates: candidates, replacing: victim)
    }
}
