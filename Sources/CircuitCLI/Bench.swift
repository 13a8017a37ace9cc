import ArgumentParser
import CircuitRaft
import Foundation
import Logging

struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks that print a table of figures.", subcommands: [RaftBench.self])
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
        print("64-byte entries, closed loop, \(seconds) s per round after 1 s warm-up, median of \(rounds) rounds")
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
        let cluster = try LocalCluster(directory: directory, size: 3, logger: logger)
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
