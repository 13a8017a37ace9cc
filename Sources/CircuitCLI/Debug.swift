import ArgumentParser
import CircuitRaft
import Foundation
import Logging

struct Debug: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Tools for tests.", shouldDisplay: false, subcommands: [AppendLoop.self, SnapshotLoop.self])
}

/// Appends batches to a SQLite log store forever, printing `durable N` after each commit. The store crash test
/// kills it with SIGKILL at random moments and checks that the store holds a prefix of what was written.
struct AppendLoop: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "append-loop")

    @Option(help: "The store's path.")
    var db: String

    @Option(help: "Seed of the batch sizes.")
    var seed: UInt64 = 1

    func run() throws {
        let store = try SQLiteLogStore(path: db, logger: Logger(label: "append-loop"))
        let recovered = try store.recover()
        var next = (recovered.entries.last?.index ?? 0) + 1
        var rng = SplitMix64(seed: seed)
        while true {
            let size = 1 + Int(rng.next() % 64)
            let batch = (0..<size).map { i in AppendLoop.expected(next + UInt64(i)) }
            let last = batch.last!
            try store.persist(hardState: HardState(term: last.term, vote: 1, commit: last.index), entries: batch)
            // Unbuffered: the line leaves the process as soon as the batch is durable.
            FileHandle.standardOutput.write(Data("durable \(last.index)\n".utf8))
            next += UInt64(size)
        }
    }

    /// The entry the loop writes at `index`: its term grows every 100 entries; its data is self-checking.
    static func expected(_ index: UInt64) -> Entry {
        Entry(term: 1 + index / 100, index: index, kind: .normal, data: selfCheckingBytes(index, upTo: 300))
    }
}

/// Installs snapshots as a follower does, forever: streams each snapshot file in chunks into a receiver, finishes
/// it (fsync, rename), records it in the SQLite store replacing the log, removes the old file, and prints
/// `installed N`. The snapshot crash test kills it with SIGKILL at random moments.
struct SnapshotLoop: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "snapshot-loop")

    @Option(help: "The folder for the store and the snapshot files.")
    var dir: String

    @Option(help: "Seed of the index steps.")
    var seed: UInt64 = 1

    func run() throws {
        let logger = Logger(label: "snapshot-loop")
        let store = try SQLiteLogStore(path: "\(dir)/log.sqlite", logger: logger)
        let files = try SnapshotFiles(directory: "\(dir)/snapshots", logger: logger)
        var index = try store.recover().snapshot?.index ?? 0
        var rng = SplitMix64(seed: seed)
        while true {
            index += 1 + rng.next() % 100
            let meta = SnapshotMetadata(index: index, term: 1 + index / 50, membership: Membership(voters: [1, 2, 3]))
            let file = SnapshotFiles.encode(meta, payload: Self.payload(index))
            let receiver = try files.receiver(for: meta)
            var offset = 0
            while offset < file.count {
                let end = min(file.count, offset + 65_536)
                try receiver.append(offset: UInt64(offset), Array(file[offset..<end]))
                offset = end
            }
            try receiver.finish()
            try store.saveSnapshot(meta, replacingLog: true, hardState: HardState(term: meta.term, vote: 0, commit: meta.index))
            files.removeAll(except: meta)
            FileHandle.standardOutput.write(Data("installed \(index)\n".utf8))
        }
    }

    /// The payload of the snapshot at `index`: self-checking, up to 400 kB.
    static func payload(_ index: UInt64) -> [UInt8] {
        selfCheckingBytes(index, upTo: 400_000)
    }
}

/// Bytes a reader can check without knowing how they were made: `index` (8 bytes, little-endian), fewer than `upTo`
/// bytes that vary with it, and an FNV-1a hash of all that (8 bytes, little-endian). A torn or misplaced write fails
/// the check.
func selfCheckingBytes(_ index: UInt64, upTo: Int) -> [UInt8] {
    var rng = SplitMix64(seed: index)
    var data = withUnsafeBytes(of: index.littleEndian) { Array($0) }
    data += (0..<Int(rng.next() % UInt64(upTo))).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
    var hash: UInt64 = 0xCBF2_9CE4_8422_2325
    for b in data { hash = (hash ^ UInt64(b)) &* 0x100_0000_01B3 }
    data += withUnsafeBytes(of: hash.littleEndian) { Array($0) }
    return data
}
