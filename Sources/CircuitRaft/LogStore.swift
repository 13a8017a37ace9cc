import CSQLite
import Logging

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What a store recovered on open.
public struct RecoveredLog: Sendable {
    public var hardState: HardState
    public var entries: [Entry]
    /// The snapshot the entries follow, if the log was ever compacted or a snapshot installed.
    public var snapshot: SnapshotMetadata?

    public init(hardState: HardState, entries: [Entry], snapshot: SnapshotMetadata? = nil) {
        self.hardState = hardState
        self.entries = entries
        self.snapshot = snapshot
    }
}

/// Durable storage of one node's Raft log and hard state. Owned by one thread at a time.
///
/// `persist` must be atomic and durable when it returns: after a crash at any moment, the store holds either
/// everything of a batch or nothing of it. Any error is fatal to the node: the caller must stop, never retry.
public protocol RaftLogStore: AnyObject {
    /// Everything durable, checked for consistency.
    func recover() throws -> RecoveredLog
    /// Replaces every stored entry at or after `entries.first!.index` with `entries`, and stores `hardState` if
    /// given, in one atomic, durable step.
    func persist(hardState: HardState?, entries: [Entry]) throws
    /// Entries in `[from, to]`, stopping once `maxBytes` is exceeded (always at least one if any is stored).
    func entries(from: UInt64, to: UInt64, maxBytes: Int) throws -> [Entry]
    /// Records `snapshot` as the one the log starts after, atomically and durably, and drops the entries it covers:
    /// those up to its index (compaction: at once or a batch at a time, as the store likes, since they are no longer
    /// read), or every entry (`replacingLog`: a snapshot installed from the leader, at once).
    /// The snapshot's bytes must already be durable elsewhere. `hardState`, if given, is stored in the same step
    /// (an installed snapshot comes with the leader's term, which must never be lost while the snapshot stays).
    func saveSnapshot(_ snapshot: SnapshotMetadata, replacingLog: Bool, hardState: HardState?) throws
    /// Number of durable commits (fsyncs of the log) so far.
    var syncCount: Int { get }
    /// Releases the store (its file and lock). Later writes fail.
    func close()
}

/// The log store on SQLite: WAL journal, `synchronous=FULL`, an exclusive lock, one transaction per batch.
public final class SQLiteLogStore: RaftLogStore {
    public let path: String
    private let logger: Logger
    private let db: SQLiteConnection
    private let begin: SQLiteStatement
    private let commit: SQLiteStatement
    private let rollback: SQLiteStatement
    private let deleteFrom: SQLiteStatement
    private let insert: SQLiteStatement
    private let putMeta: SQLiteStatement
    private let selectRange: SQLiteStatement
    private let deleteAll: SQLiteStatement
    private let putSnapshot: SQLiteStatement
    private let deleteRange: SQLiteStatement
    public private(set) var syncCount = 0
    /// Entries up to here are covered by the snapshot and deleted a batch at a time with later writes, so that a
    /// compaction never holds the log's writer for long.
    private var garbageThrough: UInt64 = 0
    /// The hard state the meta table holds (recovered, then each one committed): a write changes only the fields
    /// that differ from it, which for most writes is the commit index alone.
    private var written: HardState?
    private var deletedThrough: UInt64 = 0
    private static let deleteBatch: UInt64 = 2_000

    private static let schemaVersion = 1

    /// Opens (creating if needed) the store at `path`.
    public init(path: String, logger: Logger) throws {
        self.path = path
        self.logger = logger
        let existed = access(path, F_OK) == 0
        db = try SQLiteConnection(path: path)
        // One owner: EXCLUSIVE locking keeps a second process off the file and lets WAL run without shared memory.
        try db.execute("PRAGMA locking_mode=EXCLUSIVE")
        let mode = try db.scalarText("PRAGMA journal_mode=WAL")
        guard mode == "wal" else {
            throw SQLiteError(code: SQLITE_ERROR, message: "journal_mode is \(mode ?? "unknown")", context: "enabling WAL on \(path)")
        }
        // FULL: every commit syncs the WAL. NORMAL would lose the latest commits on power loss.
        try db.execute("PRAGMA synchronous=FULL")
        try db.execute("PRAGMA busy_timeout=5000")
        let version = Int(try db.scalarText("PRAGMA user_version") ?? "0") ?? 0
        if version == 0 {
            try db.execute(
                """
                BEGIN IMMEDIATE;
                CREATE TABLE IF NOT EXISTS entries(
                    idx INTEGER PRIMARY KEY, term INTEGER NOT NULL, kind INTEGER NOT NULL, data BLOB NOT NULL);
                CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
                CREATE TABLE IF NOT EXISTS snapshot(
                    id INTEGER PRIMARY KEY CHECK (id = 1), idx INTEGER NOT NULL, term INTEGER NOT NULL,
                    membership BLOB NOT NULL);
                PRAGMA user_version=\(Self.schemaVersion);
                COMMIT;
                """)
        } else if version != Self.schemaVersion {
            throw SQLiteError(
                code: SQLITE_MISMATCH, message: "schema version \(version), expected \(Self.schemaVersion)",
                context: "opening \(path)")
        }
        if !existed {
            // The new file's directory entry must be durable too.
            let dir = path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
            try fsyncDirectory(dir.isEmpty ? (path.hasPrefix("/") ? "/" : ".") : dir)
        }
        begin = try db.prepare("BEGIN IMMEDIATE")
        commit = try db.prepare("COMMIT")
        rollback = try db.prepare("ROLLBACK")
        deleteFrom = try db.prepare("DELETE FROM entries WHERE idx >= ?")
        insert = try db.prepare("INSERT INTO entries(idx, term, kind, data) VALUES (?, ?, ?, ?)")
        putMeta = try db.prepare("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value")
        selectRange = try db.prepare("SELECT idx, term, kind, data FROM entries WHERE idx >= ? AND idx <= ? ORDER BY idx")
        deleteAll = try db.prepare("DELETE FROM entries")
        deleteRange = try db.prepare("DELETE FROM entries WHERE idx > ? AND idx <= ?")
        putSnapshot = try db.prepare(
            "INSERT INTO snapshot(id, idx, term, membership) VALUES (1, ?, ?, ?) "
                + "ON CONFLICT(id) DO UPDATE SET idx = excluded.idx, term = excluded.term, membership = excluded.membership")
    }

    public func close() {
        db.close()
    }

    public func recover() throws -> RecoveredLog {
        var hs = HardState()
        let meta = try db.prepare("SELECT key, value FROM meta")
        while try meta.step() {
            let value = UInt64(bitPattern: meta.int(1))
            switch meta.text(0) {
            case "term": hs.term = value
            case "vote": hs.vote = value
            case "commit": hs.commit = value
            default: break
            }
        }
        var snapshot: SnapshotMetadata? = nil
        let snap = try db.prepare("SELECT idx, term, membership FROM snapshot WHERE id = 1")
        if try snap.step() {
            let membership: Membership
            do {
                membership = try Membership(decoding: snap.blob(2))
            } catch {
                snap.reset()
                throw RaftStoreCorruption(path: path, detail: "snapshot membership: \(error)")
            }
            snapshot = SnapshotMetadata(index: UInt64(snap.int(0)), term: UInt64(snap.int(1)), membership: membership)
            snap.reset()
        }
        // Entries the snapshot covers may still be there, awaiting deletion: they are not part of the log.
        let all = try entries(from: (snapshot?.index ?? 0) + 1, to: UInt64(Int64.max), maxBytes: Int.max)
        garbageThrough = snapshot?.index ?? 0
        let lowest = try db.prepare("SELECT MIN(idx) FROM entries")
        deletedThrough = try lowest.step() ? UInt64(max(1, lowest.int(0))) - 1 : garbageThrough
        lowest.reset()
        if let snapshot, let first = all.first, first.index != snapshot.index + 1 {
            throw RaftStoreCorruption(path: path, detail: "the log starts at \(first.index) after a snapshot at \(snapshot.index)")
        }
        if let snapshot, let first = all.first, first.term < snapshot.term {
            throw RaftStoreCorruption(path: path, detail: "entry \(first.index) has term \(first.term) below the snapshot's \(snapshot.term)")
        }
        if let snapshot, snapshot.term > hs.term {
            throw RaftStoreCorruption(path: path, detail: "the snapshot's term \(snapshot.term) is above the hard state's term \(hs.term)")
        }
        var previous: Entry? = nil
        for e in all {
            if let p = previous {
                guard e.index == p.index + 1 else {
                    throw RaftStoreCorruption(path: path, detail: "gap in the log: \(e.index) follows \(p.index)")
                }
                guard e.term >= p.term else {
                    throw RaftStoreCorruption(path: path, detail: "term goes down at \(e.index): \(e.term) after \(p.term)")
                }
            }
            previous = e
        }
        let last = all.last?.index ?? snapshot?.index ?? 0
        guard hs.commit <= last else {
            throw RaftStoreCorruption(path: path, detail: "commit index \(hs.commit) is beyond the last entry \(last)")
        }
        if let lastTerm = all.last?.term, lastTerm > hs.term {
            throw RaftStoreCorruption(path: path, detail: "last entry's term \(lastTerm) is above the hard state's term \(hs.term)")
        }
        written = hs
        logger.debug("recovered log", metadata: ["path": "\(path)", "entries": "\(all.count)", "term": "\(hs.term)", "commit": "\(hs.commit)"])
        return RecoveredLog(hardState: hs, entries: all, snapshot: snapshot)
    }

    public func saveSnapshot(_ snapshot: SnapshotMetadata, replacingLog: Bool, hardState: HardState?) throws {
        try transaction {
            if replacingLog {
                try deleteAll.run()
            }
            try putSnapshot.run(.int(Int64(snapshot.index)), .int(Int64(snapshot.term)), .blob(snapshot.membership.encoded))
            if let hardState { try writeHardState(hardState) }
        }
        if let hardState { written = hardState }
        if replacingLog { deletedThrough = snapshot.index }
        garbageThrough = max(garbageThrough, snapshot.index)
    }

    /// Deletes the next batch of entries a snapshot covers (inside the caller's transaction).
    private func deleteGarbageBatch() throws {
        guard deletedThrough < garbageThrough else { return }
        let upTo = min(garbageThrough, deletedThrough + Self.deleteBatch)
        try deleteRange.run(.int(Int64(deletedThrough)), .int(Int64(upTo)))
        deletedThrough = upTo
    }

    /// Runs `body` in one write transaction, counted as one sync; any error rolls back, is logged and rethrown.
    private func transaction(_ body: () throws -> Void) throws {
        try begin.run()
        do {
            try body()
            try commit.run()
            syncCount += 1
        } catch {
            try? rollback.run()
            logger.critical("log store write failed; the node must stop", metadata: ["path": "\(path)", "error": "\(error)"])
            throw error
        }
    }

    public func persist(hardState: HardState?, entries new: [Entry]) throws {
        guard hardState != nil || !new.isEmpty else { return }
        try transaction {
            try deleteGarbageBatch()
            if let first = new.first {
                try deleteFrom.run(.int(Int64(first.index)))
                for e in new {
                    try insert.run(.int(Int64(e.index)), .int(Int64(e.term)), .int(Int64(e.kind.rawValue)), .blob(e.data))
                }
            }
            if let hs = hardState { try writeHardState(hs) }
        }
        if let hardState { written = hardState }
    }

    private func writeHardState(_ hs: HardState) throws {
        if written?.term != hs.term { try putMeta.run(.text("term"), .int(Int64(bitPattern: hs.term))) }
        if written?.vote != hs.vote { try putMeta.run(.text("vote"), .int(Int64(bitPattern: hs.vote))) }
        if written?.commit != hs.commit { try putMeta.run(.text("commit"), .int(Int64(bitPattern: hs.commit))) }
    }

    public func entries(from: UInt64, to: UInt64, maxBytes: Int) throws -> [Entry] {
        try selectRange.bind(.int(Int64(from)), .int(Int64(min(to, UInt64(Int64.max)))))
        var result: [Entry] = []
        var bytes = 0
        while try selectRange.step() {
            let kindRaw = UInt8(truncatingIfNeeded: selectRange.int(2))
            guard let kind = Entry.Kind(rawValue: kindRaw) else {
                throw RaftStoreCorruption(path: path, detail: "unknown entry kind \(kindRaw) at \(selectRange.int(0))")
            }
            let e = Entry(
                term: UInt64(selectRange.int(1)), index: UInt64(selectRange.int(0)), kind: kind, data: selectRange.blob(3))
            bytes += e.byteSize
            if !result.isEmpty && bytes > maxBytes { break }
            result.append(e)
        }
        selectRange.reset()  // the loop may have stopped before the last row
        return result
    }
}

/// The store holds something that the protocol's invariants forbid.
public struct RaftStoreCorruption: Error, Sendable, CustomStringConvertible {
    public var path: String
    public var detail: String
    public var description: String { "the Raft log at \(path) is corrupt: \(detail)" }
}

/// An in-memory store holding exactly what was persisted. For tests and benchmarks of everything but the disk.
public final class MemoryLogStore: RaftLogStore {
    public private(set) var hardState = HardState()
    public private(set) var log: [Entry] = []
    public private(set) var snapshot: SnapshotMetadata?
    public private(set) var syncCount = 0

    public init() {}

    public func recover() throws -> RecoveredLog {
        RecoveredLog(hardState: hardState, entries: log, snapshot: snapshot)
    }

    public func saveSnapshot(_ snapshot: SnapshotMetadata, replacingLog: Bool, hardState: HardState?) throws {
        if replacingLog {
            log.removeAll()
        } else {
            log.removeAll { $0.index <= snapshot.index }
        }
        self.snapshot = snapshot
        if let hardState { self.hardState = hardState }
        syncCount += 1
    }

    public func close() {}

    public func persist(hardState: HardState?, entries new: [Entry]) throws {
        if let first = new.first {
            let base = log.first?.index ?? (snapshot.map { $0.index + 1 } ?? first.index)
            let keep = Int(max(0, Int64(first.index) - Int64(base)))
            precondition(keep <= log.count, "persist leaves a gap at \(first.index)")
            log.removeSubrange(keep...)
            log.append(contentsOf: new)
        }
        if let hardState { self.hardState = hardState }
        if hardState != nil || !new.isEmpty { syncCount += 1 }
    }

    public func entries(from: UInt64, to: UInt64, maxBytes: Int) throws -> [Entry] {
        var result: [Entry] = []
        var bytes = 0
        for e in log where e.index >= from && e.index <= to {
            bytes += e.byteSize
            if !result.isEmpty && bytes > maxBytes { break }
            result.append(e)
        }
        return result
    }
}
