/// What a leader knows of one follower's log, and how it sends to it.
///
/// `probe`: the leader does not know where the logs match; it sends one append at a time and waits for the answer.
/// `replicate`: the logs match up to `match`; the leader streams appends optimistically, up to a window of in-flight
/// messages (pipelining), and advances `next` as it sends.
struct Progress: Sendable, Hashable {
    enum State: Sendable, Hashable {
        case probe
        case replicate
        /// An InstallSnapshot of this index is on its way; nothing else is sent until it is answered.
        case snapshot(pending: UInt64)
    }

    var match: UInt64 = 0
    var next: UInt64
    var state: State = .probe
    /// In probe state: an append was sent and no answer came yet.
    var probeSent = false
    /// Last index of each append in flight, oldest first (replicate state).
    var inflight: [UInt64] = []
    /// Leader ticks since this follower last answered (saturating; `Int.max`: never since this leader took over).
    var silentTicks = Int.max

    /// Answered within the last `ticks` ticks. A sliding window, not a round that is cleared: a check made just after
    /// a CheckQuorum round must not find a follower that answered a moment ago inactive.
    func heard(within ticks: Int) -> Bool { silentTicks < ticks }
    /// `match` when the previous heartbeat answer came: no change across rounds means an append was lost.
    var matchAtLastHeartbeat: UInt64 = 0
    /// Consecutive heartbeat rounds with `match` stuck below the leader's log.
    var stalledRounds = 0

    init(next: UInt64) {
        self.next = next
    }

    func isPaused(maxInflight: Int) -> Bool {
        switch state {
        case .probe: return probeSent
        case .replicate: return inflight.count >= maxInflight
        case .snapshot: return true
        }
    }

    /// A successful answer up to `index`. Returns whether it told the leader anything new.
    mutating func update(matched index: UInt64) -> Bool {
        var changed = false
        if index > match {
            match = index
            changed = true
            probeSent = false
        }
        next = max(next, index + 1)
        freeInflight(upTo: index)
        return changed
    }

    mutating func freeInflight(upTo index: UInt64) {
        var n = 0
        while n < inflight.count && inflight[n] <= index { n += 1 }
        if n > 0 { inflight.removeFirst(n) }
    }

    mutating func becomeProbe() {
        state = .probe
        probeSent = false
        inflight.removeAll()
        next = match + 1
    }

    mutating func becomeSnapshot(_ index: UInt64) {
        state = .snapshot(pending: index)
        probeSent = false
        inflight.removeAll()
    }

    mutating func becomeReplicate() {
        state = .replicate
        probeSent = false
        inflight.removeAll()
        next = match + 1
    }

    /// The follower refused an append at `rejected`; `hint` is the highest index where the logs may match.
    /// Returns false if the refusal is stale (answers an older append).
    mutating func decrease(rejected: UInt64, hint: UInt64) -> Bool {
        switch state {
        case .replicate:
            // Only a refusal above what is known to match is news; the rest are answers to old appends.
            if rejected <= match { return false }
            becomeProbe()
            next = max(match + 1, min(rejected, hint + 1))
            return true
        case .snapshot:
            return false
        case .probe:
            // Only the answer to the probe in flight counts.
            if next - 1 != rejected { return false }
            next = max(match + 1, min(rejected, hint + 1))
            probeSent = false
            return true
        }
    }
}
