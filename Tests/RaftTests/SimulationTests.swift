import CircuitTestSupport
import Foundation
import Testing

@testable import CircuitRaft

/// Runs the deterministic simulation over many seeds. `RAFT_SIM_SEEDS=N` (default 1000) sets how many,
/// `RAFT_SIM_START=S` the first; `RAFT_SIM_SEED=S` replays one seed in `replay`.
@Suite struct SimulationTests {
    static let seedCount = Int(ProcessInfo.processInfo.environment["RAFT_SIM_SEEDS"] ?? "") ?? 1000
    static let firstSeed = UInt64(ProcessInfo.processInfo.environment["RAFT_SIM_START"] ?? "") ?? 1
    static let chunks = 8
    static let cores = DispatchSemaphore(value: 2)

    static func options(seed: UInt64) -> Simulation.Options {
        var o = Simulation.Options()
        o.seed = seed
        o.nodes = seed % 2 == 0 ? 3 : 5
        // One run in 50 uses the real SQLite store in a temporary folder (shorter: every batch is an fsync).
        o.useSQLite = seed % 50 == 0
        if o.useSQLite { o.faultyMillis = 1_500 }
        // One run in three with asynchronous storage writes (as the daemon runs).
        o.asyncWrites = seed % 3 == 0
        return o
    }

    /// What one chunk of seeds did.
    struct Totals: Sendable {
        var failures: [String] = []
        var acknowledged = 0, elections = 0, crashes = 0, reads = 0, configChanges = 0, transfers = 0
        var snapshotsInstalled = 0, snapshotsTaken = 0, runs = 0, forwardedPlaced = 0
    }

    @Test("simulated clusters keep Raft's safety properties and recover liveness", arguments: 0..<chunks)
    func seeds(chunk: Int) async throws {
        // CPU-bound for tens of seconds: on a thread of its own, so the daemon tests running meanwhile keep theirs.
        let t = try await onOwnThread {
            // Two chunks at a time: one per core.
            Self.cores.wait()
            defer { Self.cores.signal() }
            return try Self.run(chunk: chunk)
        }
        for f in t.failures { Issue.record(Comment(rawValue: f)) }
        // The runs did real work under real faults.
        #expect(t.runs > 0)
        if t.runs >= 20 {
            #expect(t.acknowledged > t.runs * 10, "acknowledged \(t.acknowledged) proposals in \(t.runs) runs")
            #expect(t.elections >= t.runs, "elections \(t.elections) in \(t.runs) runs")
            #expect(t.crashes > 0)
            #expect(t.reads > 0)
            #expect(t.forwardedPlaced > t.runs, "forwarded proposals placed \(t.forwardedPlaced) in \(t.runs) runs")
            #expect(t.configChanges > t.runs, "config changes \(t.configChanges) in \(t.runs) runs")
            #expect(t.transfers > 0)
            #expect(t.snapshotsTaken > t.runs)
            #expect(t.snapshotsInstalled > 0)
        }
    }

    static func run(chunk: Int) throws -> Totals {
        var failures: [String] = []
        var acknowledged = 0
        var elections = 0
        var crashes = 0
        var reads = 0
        var configChanges = 0
        var transfers = 0
        var snapshotsInstalled = 0
        var snapshotsTaken = 0
        var runs = 0
        var forwardedPlaced = 0
        var seed = Self.firstSeed + UInt64(chunk)
        while seed < Self.firstSeed + UInt64(Self.seedCount) {
            let sim = try Simulation(options: Self.options(seed: seed))
            do {
                try sim.run()
            } catch let failure as SimulationFailure {
                failures.append("\(failure)\n  (\(sim.description))")
            }
            acknowledged += sim.acknowledged.count
            elections += sim.elections
            crashes += sim.crashes
            reads += sim.readsServed
            configChanges += sim.configChanges
            transfers += sim.transfers
            snapshotsInstalled += sim.snapshotsInstalled
            snapshotsTaken += sim.snapshotsTaken
            forwardedPlaced += sim.forwardedPlaced
            runs += 1
            seed += UInt64(Self.chunks)
            if failures.count >= 3 { break }
        }
        return Totals(
            failures: failures, acknowledged: acknowledged, elections: elections, crashes: crashes, reads: reads,
            configChanges: configChanges, transfers: transfers, snapshotsInstalled: snapshotsInstalled,
            snapshotsTaken: snapshotsTaken, runs: runs, forwardedPlaced: forwardedPlaced)
    }

    @Test("replay one seed (RAFT_SIM_SEED, default 1)")
    func replay() throws {
        let seed = UInt64(ProcessInfo.processInfo.environment["RAFT_SIM_SEED"] ?? "") ?? 1
        let sim = try Simulation(options: Self.options(seed: seed))
        try sim.run()
        #expect(!sim.acknowledged.isEmpty)
    }

    @Test("the simulation is deterministic: one seed, one history")
    func deterministic() throws {
        let a = try Simulation(options: Self.options(seed: 42))
        try a.run()
        let b = try Simulation(options: Self.options(seed: 42))
        try b.run()
        #expect(a.committed == b.committed)
        #expect(a.crashes == b.crashes)
        #expect(a.now == b.now)
    }

    @Test("the checks catch a broken protocol: a node that forgets its vote elects two leaders")
    func checksCatchForgottenVotes() throws {
        // Losing the hard state (as a store without fsync would) must trip election safety sooner or later.
        var caught = false
        for seed in UInt64(1)...200 where !caught {
            var o = Self.options(seed: seed)
            o.useSQLite = false
            let sim = try Simulation(options: o)
            sim.forgetDurableStateOnRestart = true
            do { try sim.run() } catch is SimulationFailure { caught = true }
        }
        #expect(caught, "wiping a node's durable state on restart went unnoticed in 200 seeds")
    }
}
