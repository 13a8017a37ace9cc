import ArgumentParser
import CircuitRaft
import Foundation

/// The main job until the daemon exists: a 3-node Raft cluster in this process, with real SQLite stores on disk,
/// committing entries while its leader is killed and restarted.
struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a 3-node Raft cluster in one process on real on-disk stores, kill and restart its leader.")

    @OptionGroup var global: GlobalOptions

    @Option(help: "Folder for the nodes' SQLite stores (default: a new temporary folder, removed afterwards).")
    var data: String?

    @Option(help: "Entries to commit in each phase.")
    var entries: Int = 300

    @Option(help: "Concurrent proposers.")
    var clients: Int = 16

    func run() async throws {
        let logger = global.makeLogger("circuit.demo")
        let directory = data ?? temporaryDirectory("circuit-demo")
        defer { if data == nil { try? FileManager.default.removeItem(atPath: directory) } }
        func say(_ line: String) { print(line) }

        say("circuit demo: 3 Raft nodes, SQLite stores in \(directory)")
        let cluster = try LocalCluster(directory: directory, size: 3, logger: logger)
        defer { cluster.shutdown() }
        let clock = ContinuousClock()

        var start = clock.now
        let first = try await cluster.waitForLeader()
        say("  node \(first) elected leader in \(fmt(start.duration(to: clock.now))) (term \(cluster.driver(first)!.status.term))")

        start = clock.now
        try await commit(cluster, count: entries, tag: "before")
        say("  committed \(entries) entries from \(clients) clients in \(fmt(start.duration(to: clock.now)))")

        say("  killing leader \(first)")
        cluster.kill(first)
        start = clock.now
        let second = try await cluster.waitForLeader()
        say("  node \(second) took over in \(fmt(start.duration(to: clock.now))) (term \(cluster.driver(second)!.status.term))")

        start = clock.now
        try await commit(cluster, count: entries, tag: "during")
        say("  committed \(entries) more entries with node \(first) down in \(fmt(start.duration(to: clock.now)))")

        say("  restarting node \(first) from its store")
        start = clock.now
        try cluster.start(first)
        let target = cluster.driver(second)!.status.commitIndex
        try await cluster.wait("node \(first) to catch up") {
            (cluster.driver(first)?.status.appliedIndex ?? 0) >= target
        }
        say("  node \(first) recovered and caught up to index \(target) in \(fmt(start.duration(to: clock.now)))")

        let current = cluster.leader!
        say("  stopping leader \(current) gracefully: it hands over first")
        start = clock.now
        await cluster.stopGracefully(current)
        let successor = try await cluster.waitForLeader()
        say("  node \(successor) leads \(fmt(start.duration(to: clock.now))) later (no election timeout to wait out)")
        try cluster.start(current)
        try await cluster.propose(Array("after-transfer".utf8))

        let readAt = try await cluster.driver(cluster.leader!)!.readBarrier()
        say("  a linearizable read (ReadIndex) on the leader is served at applied index \(readAt)")

        // Every replica applied the same sequence.
        try await cluster.wait("all nodes to apply the same log") {
            let applied = cluster.liveIDs.map { cluster.driver($0)!.status.appliedIndex }
            return Set(applied).count == 1
        }
        say("")
        say("  node  role       term  commit  applied  entries  checksum          fsyncs")
        for status in cluster.statuses() {
            let m = cluster.machine(status.id)!
            say(
                "  \(pad(status.id, 4))  \(pad(status.role.rawValue, 9))  \(pad(status.term, 4))  \(pad(status.commitIndex, 6))  "
                    + "\(pad(status.appliedIndex, 7))  \(pad(m.count, 7))  \(String(m.hash, radix: 16))  \(status.syncCount)")
        }
        let hashes = Set(cluster.liveIDs.map { cluster.machine($0)!.hash })
        guard hashes.count == 1 else { throw ClusterError.mismatch("replicas diverged: \(hashes)") }
        say("")
        say("ok: \(2 * entries + 1) entries acknowledged; all 3 replicas applied the same log, including the restarted nodes")
    }

    private func commit(_ cluster: LocalCluster, count: Int, tag: String) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            for c in 0..<clients {
                group.addTask {
                    var i = c
                    while i < count {
                        try await cluster.propose(Array("\(tag)-\(i)".utf8))
                        i += clients
                    }
                }
            }
            try await group.waitForAll()
        }
    }
}

func fmt(_ d: Duration) -> String { String(format: "%.0f ms", d.milliseconds) }

func pad(_ value: some CustomStringConvertible, _ width: Int) -> String {
    let s = value.description
    return s.count >= width ? s : s + String(repeating: " ", count: width - s.count)
}
