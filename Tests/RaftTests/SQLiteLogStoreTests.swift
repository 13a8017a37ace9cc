import Foundation
import Logging
import CircuitTestSupport
import Testing

@testable import CircuitRaft

private func temporaryPath(_ name: String) throws -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("raft-store-\(UUID().uuidString.prefix(8))")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    return dir.appendingPathComponent(name).path
}

private func entry(_ index: UInt64, term: UInt64, _ text: String = "") -> Entry {
    Entry(term: term, index: index, kind: .normal, data: Array(text.utf8))
}

@Suite("SQLite log store")
struct SQLiteLogStoreTests {
    let logger = Logger(label: "test")

    @Test("entries and hard state survive closing and reopening")
    func roundTrip() throws {
        let path = try temporaryPath("log.sqlite")
        do {
            let store = try SQLiteLogStore(path: path, logger: logger)
            try store.persist(
                hardState: HardState(term: 3, vote: 2, commit: 2),
                entries: [entry(1, term: 1, "a"), entry(2, term: 3, "b"), Entry(term: 3, index: 3, kind: .noop)])
            #expect(store.syncCount == 1)
            store.close()
        }
        let store = try SQLiteLogStore(path: path, logger: logger)
        let recovered = try store.recover()
        #expect(recovered.hardState == HardState(term: 3, vote: 2, commit: 2))
        #expect(recovered.entries.map(\.index) == [1, 2, 3])
        #expect(recovered.entries[1].data == Array("b".utf8))
        #expect(recovered.entries[2].kind == .noop)
        #expect(try store.entries(from: 2, to: 3, maxBytes: .max).map(\.index) == [2, 3])
    }

    @Test("a hard state that changes one field at a time, across reopenings, recovers as the last one persisted")
    func hardStateFieldByField() throws {
        let path = try temporaryPath("log.sqlite")
        // Each step is persisted by a store that recovered what the steps before left: a store writes only the
        // fields that differ from what it knows the file holds.
        let steps: [HardState] = [
            HardState(term: 1, vote: 0, commit: 0), HardState(term: 1, vote: 7, commit: 0), HardState(term: 1, vote: 7, commit: 4),
            HardState(term: 2, vote: 7, commit: 4), HardState(term: 2, vote: 0, commit: 4), HardState(term: 2, vote: 0, commit: 9),
            HardState(term: 3, vote: 3, commit: 9),
        ]
        for (i, hs) in steps.enumerated() {
            let store = try SQLiteLogStore(path: path, logger: logger)
            let recovered = try store.recover()
            #expect(recovered.hardState == (i == 0 ? HardState() : steps[i - 1]))
            try store.persist(hardState: hs, entries: i == 0 ? (1...9).map { entry($0, term: 1) } : [])
            store.close()
        }
        do {
            // In one store, a field changed and changed back: the second write compares with the first, not with
            // what the store recovered.
            let store = try SQLiteLogStore(path: path, logger: logger)
            #expect(try store.recover().hardState == steps.last)
            try store.persist(hardState: HardState(term: 3, vote: 5, commit: 9), entries: [])
            try store.persist(hardState: HardState(term: 3, vote: 3, commit: 9), entries: [])
            store.close()
        }
        let store = try SQLiteLogStore(path: path, logger: logger)
        #expect(try store.recover().hardState == HardState(term: 3, vote: 3, commit: 9))
        // A store that did not recover the file's hard state writes every field: (5, 0, 0) over (5, 1, 3) must not
        // keep the vote and the commit index the file held.
        let other = try temporaryPath("other.sqlite")
        do {
            let s = try SQLiteLogStore(path: other, logger: logger)
            try s.persist(hardState: HardState(term: 5, vote: 1, commit: 3), entries: (1...3).map { entry($0, term: 5) })
            s.close()
        }
        do {
            let s = try SQLiteLogStore(path: other, logger: logger)
            try s.persist(hardState: HardState(term: 5, vote: 0, commit: 0), entries: [])
            s.close()
        }
        let reopened = try SQLiteLogStore(path: other, logger: logger)
        #expect(try reopened.recover().hardState == HardState(term: 5, vote: 0, commit: 0))
    }

    @Test("persisting from an index replaces the conflicting suffix")
    func truncatesSuffix() throws {
        let store = try SQLiteLogStore(path: try temporaryPath("log.sqlite"), logger: logger)
        try store.persist(hardState: HardState(term: 1), entries: (1...5).map { entry($0, term: 1) })
        try store.persist(hardState: HardState(term: 2), entries: [entry(3, term: 2, "new")])
        let recovered = try store.recover()
        #expect(recovered.entries.map(\.index) == [1, 2, 3])
        #expect(recovered.entries.last!.term == 2)
    }

    @Test("compaction records the snapshot at once, hides the covered entries, and deletes them in batches with later writes")
    func compactionIsIncremental() throws {
        let path = try temporaryPath("log.sqlite")
        let store = try SQLiteLogStore(path: path, logger: logger)
        try store.persist(hardState: HardState(term: 1), entries: (1...5_000).map { entry($0, term: 1) })
        let meta = SnapshotMetadata(index: 4_000, term: 1, membership: Membership(voters: [1, 2, 3]))
        try store.saveSnapshot(meta, replacingLog: false, hardState: nil)
        let recovered = try store.recover()
        #expect(recovered.snapshot == meta)
        #expect(recovered.entries.first?.index == 4_001 && recovered.entries.count == 1_000)
        #expect(try store.entries(from: 1, to: 4_000, maxBytes: .max).count == 4_000, "not yet deleted")
        try store.persist(hardState: nil, entries: [entry(5_001, term: 1)])
        try store.persist(hardState: nil, entries: [entry(5_002, term: 1)])
        #expect(try store.entries(from: 1, to: 4_000, maxBytes: .max).isEmpty, "deleted two batches later")
        store.close()
        // A restart in between picks up where deletion stopped.
        let reopened = try SQLiteLogStore(path: path, logger: logger)
        #expect(try reopened.recover().entries.map(\.index) == Array(4_001...5_002))
    }

    @Test("installing a snapshot from the leader replaces the whole log at once")
    func installReplacesLog() throws {
        let store = try SQLiteLogStore(path: try temporaryPath("log.sqlite"), logger: logger)
        try store.persist(hardState: HardState(term: 2), entries: (1...10).map { entry($0, term: 1) })
        let meta = SnapshotMetadata(index: 50, term: 2, membership: Membership(voters: [1, 2, 3]))
        try store.saveSnapshot(meta, replacingLog: true, hardState: HardState(term: 2, vote: 0, commit: 50))
        let recovered = try store.recover()
        #expect(recovered.snapshot == meta && recovered.entries.isEmpty)
        try store.persist(hardState: nil, entries: [entry(51, term: 2)])
        #expect(try store.recover().entries.map(\.index) == [51])
    }

    @Test("range reads stop at the byte bound but return at least one entry")
    func rangeBoundedByBytes() throws {
        let store = try SQLiteLogStore(path: try temporaryPath("log.sqlite"), logger: logger)
        let big = String(repeating: "x", count: 1000)
        try store.persist(hardState: nil, entries: (1...10).map { entry($0, term: 1, big) })
        #expect(try store.entries(from: 1, to: 10, maxBytes: 2_100).count == 2)
        #expect(try store.entries(from: 1, to: 10, maxBytes: 1).count == 1)
        #expect(try store.entries(from: 4, to: 10, maxBytes: .max).count == 7)
    }

    @Test("the store runs in WAL mode with synchronous=FULL and an exclusive lock")
    func durabilitySettings() throws {
        let path = try temporaryPath("log.sqlite")
        let store = try SQLiteLogStore(path: path, logger: logger)
        try store.persist(hardState: HardState(term: 1), entries: [entry(1, term: 1)])
        // A second opener is locked out while the first holds the file.
        #expect(throws: SQLiteError.self) {
            let other = try SQLiteLogStore(path: path, logger: logger)
            _ = try other.recover()
        }
        store.close()
        let reopened = try SQLiteLogStore(path: path, logger: logger)
        #expect(try reopened.recover().entries.count == 1)
    }

    @Test("recovery refuses a store whose commit index is beyond its log")
    func recoveryChecksInvariants() throws {
        let path = try temporaryPath("log.sqlite")
        let store = try SQLiteLogStore(path: path, logger: logger)
        try store.persist(hardState: HardState(term: 1, vote: 0, commit: 9), entries: [entry(1, term: 1)])
        #expect(throws: RaftStoreCorruption.self) { try store.recover() }
    }

    @Test("a write after close fails loudly instead of being lost")
    func writeAfterCloseFails() throws {
        let store = try SQLiteLogStore(path: try temporaryPath("log.sqlite"), logger: logger)
        store.close()
        #expect(throws: SQLiteError.self) { try store.persist(hardState: HardState(term: 1), entries: []) }
    }

    @Test("SIGKILL at random moments leaves exactly a durable prefix, never a torn or reordered entry")
    func killNineLeavesAPrefix() async throws {
        let binary = try #require(circuitBinary(), "the circuit executable was not built next to the tests")
        let path = try temporaryPath("crash.sqlite")
        var rng = SplitMix64(seed: UInt64(Date().timeIntervalSince1970))
        var lastDurable: UInt64 = 0
        let rounds = 25
        for round in 0..<rounds {
            // Kill it after a random number of durable batches: the moment falls anywhere in a write.
            // The waits for the child block: off the cooperative pool.
            let killAfter = 1 + Int(rng.next() % 40)
            let reported = try await onOwnThread {
                try runChildUntilKilled(
                    binary, ["debug", "append-loop", "--db", path, "--seed", "\(round + 1)"], prefix: "durable ",
                    killAfter: killAfter)
            }
            #expect(reported == reported.sorted() && reported.first.map { $0 > lastDurable } ?? true)
            lastDurable = reported.last ?? lastDurable

            let store = try SQLiteLogStore(path: path, logger: logger)
            let recovered = try store.recover()
            store.close()
            let entries = recovered.entries
            #expect(entries.first?.index == 1)
            #expect(UInt64(entries.count) >= lastDurable, "round \(round): \(entries.count) entries, \(lastDurable) reported durable")
            for (i, e) in entries.enumerated() {
                #expect(e.index == UInt64(i + 1))
                #expect(e.term == 1 + e.index / 100)
                #expect(isSelfChecking(e.data, index: e.index), "round \(round): entry \(e.index) is torn or misplaced")
            }
            #expect(recovered.hardState.commit <= UInt64(entries.count))
            lastDurable = max(lastDurable, UInt64(entries.count))
        }
        #expect(lastDurable > UInt64(rounds))
    }

}

@Suite("Snapshot files")
struct SnapshotFilesTests {
    let logger = Logger(label: "test")
    let meta = SnapshotMetadata(index: 42, term: 3, membership: Membership(voters: [1, 2, 3], learners: [4]))

    private func folder() throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("snapfiles-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        return dir.path
    }

    @Test("a written snapshot loads back exactly, and names itself")
    func roundTrip() throws {
        let files = try SnapshotFiles(directory: try folder(), logger: logger)
        let payload = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try files.write(meta, payload: payload)
        #expect(try files.load(meta) == payload)
        var other = meta
        other.term = 4
        #expect(throws: SnapshotFileError.self) { try files.load(other) }
    }

    @Test("a snapshot written a MiB at a time from its payload is the file encode makes, checksum included", arguments: [0, 1, 7, 8, 9, 1 << 20, (1 << 20) + 3, 3 * (1 << 20) - 5])
    func streamedWrite(_ count: Int) throws {
        let dir = try folder()
        let files = try SnapshotFiles(directory: dir, logger: logger)
        let payload = (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 5) }
        try files.write(meta, payload: payload)
        let written = try [UInt8](Data(contentsOf: URL(fileURLWithPath: files.path(for: meta))))
        #expect(written == SnapshotFiles.encode(meta, payload: payload))
        #expect(try files.load(meta) == payload)
    }

    @Test("streamed chunks must arrive in order; a torn or foreign file is refused at finish")
    func receiverChecks() throws {
        let files = try SnapshotFiles(directory: try folder(), logger: logger)
        let bytes = SnapshotFiles.encode(meta, payload: Array(repeating: 9, count: 1000))
        let receiver = try files.receiver(for: meta)
        try receiver.append(offset: 0, Array(bytes[0..<100]))
        #expect(throws: SnapshotFileError.self) { try receiver.append(offset: 500, Array(bytes[500..<600])) }
        try receiver.append(offset: 100, Array(bytes[100..<(bytes.count - 1)]))  // one byte short: torn
        #expect(throws: SnapshotFileError.self) { try receiver.finish() }
        #expect(throws: SnapshotFileError.self) { try files.load(meta) }
    }

    @Test("leftover temporary files are removed on open; old snapshots on request")
    func cleanup() throws {
        let dir = try folder()
        let files = try SnapshotFiles(directory: dir, logger: logger)
        _ = try files.receiver(for: meta)  // abandoned when dropped
        #expect(FileManager.default.createFile(atPath: "\(dir)/snap-x.snap.tmp", contents: Data([1, 2, 3])))
        var older = meta
        older.index = 10
        try files.write(older, payload: [1])
        try files.write(meta, payload: [2])
        _ = try SnapshotFiles(directory: dir, logger: logger)
        files.removeAll(except: meta)
        let names = try FileManager.default.contentsOfDirectory(atPath: dir)
        #expect(names == [URL(fileURLWithPath: files.path(for: meta)).lastPathComponent])
    }

    @Test("SIGKILL during snapshot installs leaves the old snapshot or the new one, whole")
    func killNineDuringInstall() async throws {
        let binary = try #require(circuitBinary(), "the circuit executable was not built next to the tests")
        let dir = try folder()
        var rng = SplitMix64(seed: UInt64(Date().timeIntervalSince1970))
        var lastInstalled: UInt64 = 0
        let rounds = 20
        for round in 0..<rounds {
            let killAfter = 1 + Int(rng.next() % 6)
            let reported = try await onOwnThread {
                try runChildUntilKilled(
                    binary, ["debug", "snapshot-loop", "--dir", dir, "--seed", "\(round + 1)"], prefix: "installed ",
                    killAfter: killAfter)
            }
            #expect(reported == reported.sorted() && reported.first.map { $0 > lastInstalled } ?? true)
            lastInstalled = reported.last ?? lastInstalled

            let store = try SQLiteLogStore(path: "\(dir)/log.sqlite", logger: logger)
            let recovered = try store.recover()
            store.close()
            let snapshot = try #require(recovered.snapshot, "round \(round): no snapshot recorded")
            #expect(snapshot.index >= lastInstalled, "round \(round): the store names \(snapshot.index), \(lastInstalled) was reported")
            let files = try SnapshotFiles(directory: "\(dir)/snapshots", logger: logger)
            let payload = try files.load(snapshot)
            #expect(isSelfChecking(payload, index: snapshot.index), "round \(round): the payload of \(snapshot.index) is not whole")
            let leftovers = try FileManager.default.contentsOfDirectory(atPath: "\(dir)/snapshots").filter { $0.hasSuffix(".tmp") }
            #expect(leftovers.isEmpty)
            lastInstalled = snapshot.index
        }
    }

}

struct ChildNotKilled: Error, CustomStringConvertible {
    var arguments: [String]
    var description: String { "the child \(arguments) ended on its own instead of being killed" }
}

/// Runs a child that prints `<prefix><number>` lines, kills it with SIGKILL once it has printed `killAfter` of them,
/// and returns every number it printed before it died.
func runChildUntilKilled(_ binary: String, _ arguments: [String], prefix: String, killAfter: Int) throws -> [UInt64] {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: binary)
    process.arguments = arguments
    let pipe = Pipe()
    process.standardOutput = pipe
    try process.run()
    var reported: [UInt64] = []
    var buffer = Data()
    var killed = false
    while true {
        let chunk = pipe.fileHandleForReading.availableData
        if chunk.isEmpty { break }
        buffer.append(chunk)
        while let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
            let line = String(decoding: buffer[buffer.startIndex..<newline], as: UTF8.self)
            buffer.removeSubrange(buffer.startIndex...newline)
            if line.hasPrefix(prefix), let n = UInt64(line.dropFirst(prefix.count)) { reported.append(n) }
        }
        if reported.count >= killAfter && !killed {
            kill(process.processIdentifier, SIGKILL)
            killed = true
        }
    }
    process.waitUntilExit()
    guard process.terminationReason == .uncaughtSignal else { throw ChildNotKilled(arguments: arguments) }
    return reported
}

/// Checks bytes made by `circuit debug`'s generators: the index first (8 bytes, little-endian) and an FNV-1a hash of
/// everything before it last.
func isSelfChecking(_ data: [UInt8], index: UInt64) -> Bool {
    guard data.count >= 16 else { return false }
    let head = data.prefix(8).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
    let stored = data.suffix(8).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
    var hash: UInt64 = 0xCBF2_9CE4_8422_2325
    for b in data.dropLast(8) { hash = (hash ^ UInt64(b)) &* 0x100_0000_01B3 }
    return UInt64(littleEndian: head) == index && UInt64(littleEndian: stored) == hash
}
