/// The log as the protocol sees it: every entry after `offset`, with the marks that say how far it is
/// durable (`stable`), committed and handed out for applying.
///
/// Invariants: `applied <= committed <= lastIndex`, `stable <= lastIndex`, and `entries[i].index == offset + 1 + i`.
struct RaftLog: Sendable, Hashable {
    /// Index of the last entry before `entries` (0 until snapshots exist) and its term.
    private(set) var offset: UInt64 = 0
    private(set) var offsetTerm: UInt64 = 0
    private(set) var entries: [Entry] = []
    /// Highest index known to be durable on this node's disk.
    private(set) var stable: UInt64 = 0
    /// Highest index handed to the store, durable or on its way there (with asynchronous storage writes the two
    /// differ while a write is under way): `stable <= handedOut <= lastIndex`.
    private(set) var handedOut: UInt64 = 0
    /// Changes whenever entries handed to the store may be replaced (a conflict truncates the log, a snapshot
    /// replaces it): a store's report of a write handed out before names an older epoch and is ignored, even if an
    /// entry of the same index and term came back since (A, B, then A again).
    private(set) var epoch: UInt64 = 0
    private(set) var committed: UInt64 = 0
    /// Highest index handed out for applying.
    private(set) var applied: UInt64 = 0

    init() {}

    /// A log recovered from disk: everything in it is durable. Its entries follow `snapshot` (if any).
    init(recovered: [Entry], commit: UInt64, snapshot: SnapshotMetadata? = nil) {
        self.entries = recovered
        if let snapshot {
            self.offset = snapshot.index
            self.offsetTerm = snapshot.term
        } else if let first = recovered.first {
            precondition(first.index >= 1, "recovered log starts at index 0")
            self.offset = first.index - 1
        }
        precondition(recovered.first.map { $0.index == offset + 1 } ?? true, "recovered entries do not follow the snapshot")
        self.stable = lastIndex
        self.handedOut = lastIndex
        self.committed = max(offset, min(commit, lastIndex))
        self.applied = offset
    }

    /// Drops the entries up to `index`, which a snapshot now covers. `index` must be applied.
    mutating func compact(through index: UInt64) {
        guard index > offset else { return }
        precondition(index <= applied && index <= stable, "compacting \(index) beyond applied \(applied) or stable \(stable)")
        let term = self.term(at: index)!
        // Into an array of its own size: removing in place would keep the room of every entry the snapshot covers
        // (100,000 by default, 3 MB of entries without their commands) until the next compaction.
        var kept: [Entry] = []
        kept.reserveCapacity(entries.count - Int(index - offset))
        kept.append(contentsOf: entries[Int(index - offset)...])
        entries = kept
        offset = index
        offsetTerm = term
    }

    /// Replaces the whole log with a snapshot received from the leader.
    mutating func restore(_ snapshot: SnapshotMetadata) {
        entries.removeAll()
        offset = snapshot.index
        offsetTerm = snapshot.term
        stable = snapshot.index
        handedOut = snapshot.index
        epoch += 1
        committed = snapshot.index
        applied = snapshot.index
    }

    /// The last config entry at or before `index`, if the log still holds one.
    func lastConfig(atOrBefore index: UInt64) -> Entry? {
        var i = min(index, lastIndex)
        while i > offset {
            let e = entries[Int(i - offset - 1)]
            if e.kind == .config { return e }
            i -= 1
        }
        return nil
    }

    var firstIndex: UInt64 { offset + 1 }
    var lastIndex: UInt64 { offset + UInt64(entries.count) }
    var lastTerm: UInt64 { entries.last?.term ?? offsetTerm }

    /// The term of the entry at `index`, or nil if the log does not hold it.
    func term(at index: UInt64) -> UInt64? {
        if index == offset { return offsetTerm }
        guard index > offset, index <= lastIndex else { return nil }
        return entries[Int(index - offset - 1)].term
    }

    func matches(index: UInt64, term: UInt64) -> Bool { self.term(at: index) == term }

    /// Whether a log ending at (`lastTerm`, `lastIndex`) is at least as up to date as this one (Raft §5.4.1).
    func isUpToDate(lastIndex: UInt64, lastTerm: UInt64) -> Bool {
        lastTerm > self.lastTerm || (lastTerm == self.lastTerm && lastIndex >= self.lastIndex)
    }

    /// Entries in `[from, to]`, at most `maxBytes` of them but always at least one.
    func slice(from: UInt64, to: UInt64, maxBytes: Int) -> [Entry] {
        guard from <= to, from > offset, to <= lastIndex else { return [] }
        var result: [Entry] = []
        var bytes = 0
        var i = from
        while i <= to {
            let e = entries[Int(i - offset - 1)]
            bytes += e.byteSize
            if !result.isEmpty && bytes > maxBytes { break }
            result.append(e)
            i += 1
        }
        return result
    }

    /// Appends entries produced by this node as leader.
    mutating func append(_ new: [Entry]) {
        guard let first = new.first else { return }
        precondition(first.index == lastIndex + 1, "append leaves a gap: \(first.index) after \(lastIndex)")
        entries.append(contentsOf: new)
    }

    /// Merges entries received from the leader after (`prevIndex`, `prevTerm`), which must match.
    /// Entries already present with the same term are kept; from the first conflict on, the log is replaced.
    /// Returns the index of the last new entry, and the index from which the log was replaced (if it was).
    mutating func merge(after prevIndex: UInt64, new: [Entry]) -> (lastNew: UInt64, replacedFrom: UInt64?) {
        let lastNew = prevIndex + UInt64(new.count)
        var firstConflict: Int? = nil
        for (i, e) in new.enumerated() where e.index > offset {
            if term(at: e.index) != e.term {
                firstConflict = i
                break
            }
        }
        guard let conflict = firstConflict else { return (lastNew, nil) }
        let at = new[conflict].index
        precondition(at > committed, "conflict at \(at) would overwrite the committed index \(committed)")
        if at <= lastIndex {
            entries.removeSubrange(Int(at - offset - 1)...)
            stable = min(stable, at - 1)
            handedOut = min(handedOut, at - 1)
            epoch += 1
        }
        entries.append(contentsOf: new[conflict...])
        return (lastNew, at)
    }

    /// Entries not yet handed to the store.
    var toPersist: ArraySlice<Entry> {
        entries[Int(handedOut - offset)...]
    }

    /// Entries up to `index` were handed to the store.
    mutating func handedOut(through index: UInt64) {
        precondition(index <= lastIndex, "handing out \(index) beyond the last index \(lastIndex)")
        if index > handedOut { handedOut = index }
    }

    /// The store has made entries up to (`index`, `term`) durable. Ignored if the log changed under it since.
    mutating func stableTo(index: UInt64, term: UInt64) {
        if index > stable, index <= handedOut, self.term(at: index) == term { stable = index }
    }

    /// The store's report of a write handed out in `epoch`: ignored if the log was truncated or replaced since.
    mutating func persisted(through index: UInt64, term: UInt64, epoch: UInt64) {
        if epoch == self.epoch { stableTo(index: index, term: term) }
    }

    mutating func commitTo(_ index: UInt64) {
        if index > committed {
            precondition(index <= lastIndex, "commit \(index) beyond the last index \(lastIndex)")
            committed = index
        }
    }

    /// Committed entries not yet handed out for applying, up to `limit` (never past the commit index), at most
    /// `maxBytes` of them (at least one).
    func nextToApply(maxBytes: Int, upTo limit: UInt64) -> [Entry] {
        let last = min(committed, limit)
        return applied < last ? slice(from: applied + 1, to: last, maxBytes: maxBytes) : []
    }

    mutating func appliedTo(_ index: UInt64) {
        precondition(index <= committed, "applied \(index) beyond commit \(committed)")
        if index > applied { applied = index }
    }

    /// For a rejection hint: the largest index `<= index` whose term is `<= term` (etcd's findConflictByTerm),
    /// so the leader skips a whole term of mismatching entries at once.
    func lastIndex(atOrBefore index: UInt64, withTermAtMost term: UInt64) -> UInt64 {
        var i = min(index, lastIndex)
        while i > offset {
            guard let t = self.term(at: i), t > term else { return i }
            i -= 1
        }
        return i
    }
}
