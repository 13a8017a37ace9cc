import ArgumentParser
import CircuitRaft
import CircuitStateMachine
import Foundation
import Logging

struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks that print a table of figures.", subcommands: [RaftBench.self, CatchUpBench.self, StateBench.self, APIBench.self, ElementsBench.self, MountBench.self, CompareBench.self])
}

/// A 3-node cluster in one process with real SQLite stores and an in-memory transport, driven by closed-loop
/// proposers of 64-byte entries.
struct RaftBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "raft",
        abstract: "Committed proposals/s, commit latency and fsyncs per proposal of a 3-node in-process cluster.")

    @OptionGroup var global: GlobalOptions

    @Option(help: "Concurrent proposers, comma-separated.")
    var clients: String = "1,16,256"

    @Option(help: "Seconds measured per row (after a one-second warm-up).")
    var seconds: Double = 5

    @Option(help: "Rounds per row; the table shows the median round and the spread of throughput.")
    var rounds: Int = 3

    @Option(help: "Folder for the stores (default: a temporary folder, removed afterwards).")
    var data: String?

    @Option(help: "Snapshot and compact every this many entries (default: the driver's default).")
    var snapshotEntries: UInt64?

    struct Round {
        var throughput: Double
        var p50: Double
        var p99: Double
        var leaderSyncsPerProposal: Double
        var clusterSyncsPerProposal: Double
    }

    func run() async throws {
        let logger = global.makeLogger("circuit.bench")
        let counts = clients.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        let base = data ?? temporaryDirectory("circuit-bench")
        defer { if data == nil { try? FileManager.default.removeItem(atPath: base) } }
        print("Raft benchmark: 3 nodes in one process, SQLite stores (WAL, synchronous=FULL) in \(base)")
        print("64-byte entries, closed loop, \(seconds) s per round after 1 s warm-up, median of \(rounds) rounds, snapshot every \(snapshotEntries ?? RaftDriver.Options().snapshotEntries) entries")
        print("")
        print("| proposers | committed/s (median) | spread (min–max) | p50 ms | p99 ms | fsyncs/proposal leader | fsyncs/proposal cluster |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for n in counts {
            var results: [Round] = []
            for r in 0..<rounds {
                let dir = "\(base)/c\(n)-r\(r)"
                results.append(try await measure(proposers: n, directory: dir, logger: logger))
                try? FileManager.default.removeItem(atPath: dir)
            }
            results.sort { $0.throughput < $1.throughput }
            let m = results[results.count / 2]
            print(
                "| \(n) | \(Int(m.throughput)) | \(Int(results.first!.throughput))–\(Int(results.last!.throughput)) | "
                    + String(format: "%.2f | %.2f | %.3f | %.3f |", m.p50, m.p99, m.leaderSyncsPerProposal, m.clusterSyncsPerProposal))
        }
    }

    private func measure(proposers: Int, directory: String, logger: Logger) async throws -> Round {
        var options = RaftDriver.Options()
        if let snapshotEntries { options.snapshotEntries = snapshotEntries }
        let cluster = try LocalCluster(directory: directory, size: 3, options: options, logger: logger)
        defer { cluster.shutdown() }
        let leaderID = try await cluster.waitForLeader()
        let leader = cluster.driver(leaderID)!
        let payload = [UInt8](repeating: 0x61, count: 64)
        let clock = ContinuousClock()
        let warmupEnd = clock.now + .seconds(1)
        let end = warmupEnd + .milliseconds(Int(seconds * 1000))
        let syncsBefore = SyncCounter()

        let latencies = try await withThrowingTaskGroup(of: [Double].self) { group in
            for _ in 0..<proposers {
                group.addTask {
                    var mine: [Double] = []
                    mine.reserveCapacity(4096)
                    while true {
                        let t0 = clock.now
                        if t0 >= end { break }
                        _ = try await leader.propose(payload)
                        if t0 >= warmupEnd { mine.append(t0.duration(to: clock.now).milliseconds) }
                    }
                    return mine
                }
            }
            group.addTask {
                try await Task.sleep(until: warmupEnd)
                syncsBefore.record(cluster.statuses())
                return []
            }
            var all: [Double] = []
            for try await part in group { all += part }
            return all
        }
        let after = cluster.statuses()
        guard leader.status.role == .leader else { throw ClusterError.mismatch("leadership changed during the run") }
        let committed = Double(latencies.count)
        let leaderSyncs = Double(after.first { $0.id == leaderID }!.syncCount - syncsBefore.value[leaderID, default: 0])
        let clusterSyncs = Double(after.reduce(0) { $0 + $1.syncCount } - syncsBefore.value.values.reduce(0, +))
        let sorted = latencies.sorted()
        return Round(
            throughput: committed / seconds,
            p50: sorted.isEmpty ? 0 : sorted[sorted.count / 2],
            p99: sorted.isEmpty ? 0 : sorted[min(sorted.count - 1, Int(Double(sorted.count) * 0.99))],
            leaderSyncsPerProposal: leaderSyncs / max(committed, 1),
            clusterSyncsPerProposal: clusterSyncs / max(committed, 1))
    }
}

/// fsync counts per node at the start of the measured window.
final class SyncCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var counts: [NodeID: Int] = [:]
    func record(_ statuses: [RaftStatus]) {
        lock.withLock { for s in statuses { counts[s.id] = s.syncCount } }
    }
    var value: [NodeID: Int] { lock.withLock { counts } }
}

/// A state machine that keeps every payload it applies, in 1 MiB segments. Its snapshot captures the segment list
/// (copy-on-write: the next append copies at most one segment), and the bytes are assembled on the snapshot thread.
final class PayloadStore: RaftStateMachine {
    private static let segmentBytes = 1 << 20
    private var segments: [[UInt8]] = []
    private(set) var count = 0

    func apply(_ entry: Entry) -> [UInt8] {
        if segments.isEmpty || segments[segments.count - 1].count + entry.data.count > Self.segmentBytes {
            segments.append([])
            segments[segments.count - 1].reserveCapacity(Self.segmentBytes)
        }
        segments[segments.count - 1].append(contentsOf: entry.data)
        count += 1
        return []
    }

    func snapshot() -> @Sendable () throws -> [UInt8] {
        let captured = segments
        let count = UInt64(count)
        return {
            var out = withUnsafeBytes(of: count.bigEndian) { Array($0) }
            out.reserveCapacity(8 + captured.reduce(0) { $0 + $1.count })
            for s in captured { out += s }
            return out
        }
    }

    func restore(_ payload: [UInt8]) throws {
        guard payload.count >= 8 else { throw ClusterError.mismatch("a payload snapshot of \(payload.count) bytes") }
        count = Int(payload[0..<8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) })
        segments = stride(from: 8, to: payload.count, by: Self.segmentBytes).map {
            Array(payload[$0..<min(payload.count, $0 + Self.segmentBytes)])
        }
    }

    var bytes: Int { segments.reduce(0) { $0 + $1.count } }
}

/// How fast a new learner catches up with a leader holding many entries (snapshot plus tail), and whether taking
/// snapshots stalls proposals.
struct CatchUpBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "catchup",
        abstract: "Fill a 3-node cluster with N entries (snapshots along the way), then time a new learner's catch-up.")

    @OptionGroup var global: GlobalOptions

    @Option(help: "Entries the leader holds before the learner joins.")
    var entries: Int = 1_000_000

    @Option(help: "Snapshot every this many applied entries.")
    var snapshotEntries: UInt64 = 100_000

    @Option(help: "Concurrent proposers while filling.")
    var clients: Int = 256

    @Option(help: "Folder for the stores (default: a temporary folder, removed afterwards).")
    var data: String?

    func run() async throws {
        let logger = global.makeLogger("circuit.bench")
        let dir = data ?? temporaryDirectory("circuit-catchup")
        defer { if data == nil { try? FileManager.default.removeItem(atPath: dir) } }
        var options = RaftDriver.Options()
        options.snapshotEntries = snapshotEntries
        let cluster = try LocalCluster(directory: dir, size: 3, options: options, logger: logger) { PayloadStore() }
        defer { cluster.shutdown() }
        let leaderID = try await cluster.waitForLeader()
        let leader = cluster.driver(leaderID)!
        print("Catch-up benchmark: 3 nodes in one process, SQLite stores and snapshot files in \(dir)")
        print("filling with \(entries) entries of 64 bytes from \(clients) proposers, snapshot every \(snapshotEntries) entries")

        // Fill, sampling the commit index every 100 ms and whether any node was writing a snapshot meanwhile.
        let clock = ContinuousClock()
        let payload = [UInt8](repeating: 0x62, count: 64)
        let perClient = entries / clients
        let start = clock.now
        let sampler = Task {
            var samples: [(committed: UInt64, snapshotting: Bool)] = []
            var last = leader.status.commitIndex
            while !Task.isCancelled {
                try? await Task.sleep(for: .milliseconds(100))
                let statuses = cluster.statuses()
                let now = leader.status.commitIndex
                samples.append((now - last, statuses.contains { $0.snapshotting }))
                last = now
            }
            return samples
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<clients {
                group.addTask {
                    for _ in 0..<perClient { _ = try await leader.propose(payload) }
                }
            }
            try await group.waitForAll()
        }
        let fillTime = start.duration(to: clock.now)
        sampler.cancel()
        let samples = await sampler.value
        let held = leader.status
        try await cluster.wait("the leader's snapshot to settle", timeout: .seconds(30)) { !leader.status.snapshotting }

        // A fresh learner joins.
        let joinStart = clock.now
        try cluster.start(4, machine: PayloadStore())
        try await leader.changeMembership(.addLearner(4))
        let target = leader.status.commitIndex
        try await cluster.wait("the learner to catch up", timeout: .seconds(600)) {
            (cluster.driver(4)?.status.appliedIndex ?? 0) >= target
        }
        let catchUp = joinStart.duration(to: clock.now)
        let learner = cluster.driver(4)!.status
        let leaderFolder = "\(dir)/node-\(leaderID)-snapshots"
        let snapshotBytes = try FileManager.default.contentsOfDirectory(atPath: leaderFolder)
            .filter { $0.hasSuffix(".snap") }
            .compactMap { try FileManager.default.attributesOfItem(atPath: "\(leaderFolder)/\($0)")[.size] as? Int }
            .max() ?? 0

        func median(_ xs: [UInt64]) -> Double { xs.isEmpty ? 0 : Double(xs.sorted()[xs.count / 2]) * 10 }
        let during = samples.filter { $0.snapshotting }.map(\.committed)
        let without = samples.filter { !$0.snapshotting }.map(\.committed)
        print("")
        print("| figure | value |")
        print("|---|---:|")
        print("| entries held by the leader | \(held.lastIndex) (snapshot at \(held.snapshotIndex), tail \(held.lastIndex - held.snapshotIndex)) |")
        print(String(format: "| fill time | %.1f s (%.0f committed/s) |", fillTime.milliseconds / 1000, Double(entries) / (fillTime.milliseconds / 1000)))
        print(String(format: "| committed/s, median of 100 ms windows without a snapshot being written | %.0f (%d windows) |", median(without), without.count))
        print(String(format: "| committed/s, median of 100 ms windows while a snapshot was being written | %.0f (%d windows, slowest %.0f) |", median(during), during.count, Double(during.min() ?? 0) * 10))
        print(String(format: "| leader's snapshot file | %.1f MB |", Double(snapshotBytes) / 1e6))
        print(String(format: "| learner catch-up from an empty disk (snapshot plus tail) | %.2f s |", catchUp.milliseconds / 1000))
        print("| learner: snapshots installed, snapshot index, entries replayed after it | \(learner.snapshotsInstalled), \(learner.snapshotIndex), \(learner.appliedIndex - learner.snapshotIndex) |")
    }
}

/// Apply throughput, memory and snapshot cost of the control state, in one process, no Raft.
struct StateBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "state", abstract: "Applied commands/s, bytes per record, snapshot and restore time of the control state.")

    @Option(help: "Records.")
    var records: Int = 1_000_000

    func run() throws {
        let clock = ContinuousClock()
        let paths = (0..<records).map { "/records/bench/k\(String(repeating: "0", count: 8 - String($0).count))\($0)" }
        let value = [UInt8](repeating: 0x61, count: 16)
        var state = ControlState(historyLimit: 10_000)
        var index: UInt64 = 0
        func measure(_ name: String, _ command: (Int) -> Command) -> (String, Double) {
            let start = clock.now
            for i in 0..<records {
                index += 1
                _ = state.apply(command(i), index: index)
            }
            let seconds = start.duration(to: clock.now).milliseconds / 1000
            return (name, Double(records) / seconds)
        }
        let rssBefore = residentBytes()
        let create = measure("create") { .create(path: paths[$0], element: .record(value), session: 0, sequential: false) }
        let rssAfter = residentBytes()
        let put = measure("put") { .put(path: paths[$0], value: value, session: 0) }
        let cas = measure("compare-and-set") { .compareAndSet(path: paths[$0], version: 2, value: value) }
        let encoded = (0..<records).map { Command.put(path: paths[$0], value: value, session: 0).encoded }
        var start = clock.now
        for bytes in encoded {
            index += 1
            _ = state.apply(try Command(decoding: bytes), index: index)
        }
        let decodeApply = Double(records) / (start.duration(to: clock.now).milliseconds / 1000)
        start = clock.now
        let snapshot = state.snapshot()
        let snapshotTime = start.duration(to: clock.now)
        start = clock.now
        let restored = try ControlState(restoring: snapshot)
        let restoreTime = start.duration(to: clock.now)
        guard restored.anchors.count == state.anchors.count else { throw ClusterError.mismatch("restore lost anchors") }

        print("Control state benchmark: \(records) records of 16 bytes under /records/bench, one thread, release build")
        print("")
        print("| figure | value |")
        print("|---|---:|")
        for (name, rate) in [create, put, cas] { print(String(format: "| %@ applied/s | %.0f |", name, rate)) }
        print(String(format: "| put decoded from its log bytes and applied, /s | %.0f |", decodeApply))
        print(String(format: "| resident memory per record (RSS growth over the creates / records) | %.0f bytes |", Double(rssAfter - rssBefore) / Double(records)))
        print(String(format: "| snapshot of %d records | %.0f ms, %.1f MB |", records, snapshotTime.milliseconds, Double(snapshot.count) / 1e6))
        print(String(format: "| restore of %d records | %.0f ms |", records, restoreTime.milliseconds))
    }

    private func residentBytes() -> Int {
        guard let statm = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return 0 }
        let fields = statm.split(separator: " ")
        return fields.count > 1 ? (Int(fields[1]) ?? 0) * 4096 : 0
    }
}
