import Foundation
import Logging

@testable import CircuitRaft

/// A whole Raft cluster in one process, on virtual time, driven by one seed.
///
/// The network delays, drops, duplicates and reorders messages and partitions nodes (symmetric and one-way). Nodes
/// crash and restart with only what their store made durable. After every step the Raft safety properties are
/// checked; `SimulationFailure` names the seed and the step where one broke.
final class Simulation {
    struct Options {
        var nodes = 3
        var seed: UInt64 = 1
        /// Virtual milliseconds of the faulty phase.
        var faultyMillis = 3_000
        /// Virtual milliseconds the healed cluster gets to elect a leader and commit a new proposal.
        var livenessBoundMillis = 4_000
        var useSQLite = false
        var tickMillis = 10
    }

    struct InFlight {
        var at: Int
        var message: Message
    }

    struct SimNode {
        var id: NodeID
        var raft: Raft?
        var store: any RaftLogStore
        var tickPhase: Int
        var lastRole: Role = .follower
    }

    struct Proposal: Hashable {
        var node: NodeID
        var term: UInt64
        var index: UInt64
        var payload: [UInt8]
    }

    let options: Options
    private(set) var rng: SplitMix64
    private(set) var now = 0
    private(set) var nodes: [SimNode] = []
    private var network: [InFlight] = []
    private var blocked: Set<[NodeID]> = []
    private let directory: String?
    private var raftConfig: (NodeID) -> RaftConfig = { _ in fatalError() }

    // Fault rates, drawn per seed.
    private var dropRate = 0.0
    private var duplicateRate = 0.0
    private var maxDelay = 5
    private var crashRate = 0.0
    private var partitionRate = 0.0
    private var faultsEnabled = true
    /// A deliberately broken store for testing the checks: a restarted node comes back with nothing.
    var forgetDurableStateOnRestart = false

    // What the checks know.
    /// Every (index, term) ever persisted anywhere, with the previous entry's term and the entry's content.
    private var seenEntries: [IndexTerm: (prevTerm: UInt64, entry: Entry)] = [:]
    /// The committed log, as applied by any node.
    private(set) var committed: [Entry] = []
    private var leaders: [UInt64: NodeID] = [:]
    private var pendingProposals: [Proposal] = []
    private(set) var acknowledged: [Proposal] = []
    private var payloadCounter: UInt64 = 0
    private var reads: [UInt64: (node: NodeID, minIndex: UInt64)] = [:]
    private var nextRead: UInt64 = 1
    private(set) var readsServed = 0
    private(set) var crashes = 0
    private(set) var elections = 0

    struct IndexTerm: Hashable {
        var index: UInt64
        var term: UInt64
    }

    init(options: Options) throws {
        self.options = options
        self.rng = SplitMix64(seed: options.seed &* 0x9E37_79B9_7F4A_7C15 &+ 7)
        if options.useSQLite {
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("raft-sim-\(options.seed)-\(UUID())")
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            directory = dir.path
        } else {
            directory = nil
        }
        dropRate = [0, 0.01, 0.05, 0.2].randomElement(using: &rng)!
        duplicateRate = [0, 0.02, 0.1].randomElement(using: &rng)!
        maxDelay = [1, 3, 8, 25].randomElement(using: &rng)!
        crashRate = [0, 0.0005, 0.002].randomElement(using: &rng)!
        partitionRate = [0, 0.001, 0.004].randomElement(using: &rng)!
        let preVote = rng.next() % 4 != 0
        let checkQuorum = rng.next() % 4 != 0
        let inflight = [1, 2, 8, 256].randomElement(using: &rng)!
        let maxBytes = [1, 200, 1 << 20].randomElement(using: &rng)!
        let voters = (1...options.nodes).map { NodeID($0) }
        let seed = options.seed
        raftConfig = { id in
            var c = RaftConfig(id: id, voters: voters)
            c.preVote = preVote
            c.checkQuorum = checkQuorum
            c.maxInflightMessages = inflight
            c.maxBytesPerMessage = maxBytes
            c.randomSeed = seed &* 31 &+ id
            return c
        }
        for id in voters {
            nodes.append(
                SimNode(
                    id: id, raft: try Raft(config: raftConfig(id)), store: try makeStore(id),
                    tickPhase: Int(rng.next() % UInt64(options.tickMillis))))
        }
    }

    deinit {
        if let directory { try? FileManager.default.removeItem(atPath: directory) }
    }

    private func makeStore(_ id: NodeID) throws -> any RaftLogStore {
        if let directory {
            return try SQLiteLogStore(path: "\(directory)/node-\(id).sqlite", logger: Logger(label: "sim"))
        }
        return MemoryLogStore()
    }

    var description: String {
        "seed \(options.seed): \(options.nodes) nodes, \(options.useSQLite ? "SQLite" : "memory") stores, "
            + "drop \(dropRate), dup \(duplicateRate), delay ≤\(maxDelay) ms, crash \(crashRate), partition \(partitionRate)"
    }

    // MARK: - Running

    /// The faulty phase, then healing, then the liveness check.
    func run() throws {
        while now < options.faultyMillis {
            try step()
        }
        try heal()
        let deadline = now + options.livenessBoundMillis
        let payload = Array("liveness-\(options.seed)".utf8)
        var proposed: Proposal? = nil
        while now < deadline {
            try step()
            if let p = proposed, !acknowledged.contains(p),
                nodes.first(where: { $0.id == p.node })?.raft.map({ $0.role != .leader || $0.term != p.term }) ?? true
            {
                proposed = nil  // its leader lost the term before committing it; a client would retry
            }
            if proposed == nil, let leader = nodes.firstIndex(where: { $0.raft?.role == .leader }) {
                proposed = propose(at: leader, payload: payload)
            }
            if let p = proposed, nodes.allSatisfy({ $0.raft!.appliedIndex >= p.index }) {
                if acknowledged.contains(p) {
                    try checkConverged()
                    return
                }
                proposed = nil  // overtaken by a leader change; propose again
            }
        }
        throw fail(
            "liveness: no proposal committed on every node within \(options.livenessBoundMillis) ms after healing\n"
                + nodes.map { n in
                    guard let r = n.raft else { return "  node \(n.id): down" }
                    return "  node \(n.id): \(r.role) term \(r.term) leader \(r.leader) last \(r.lastIndex)/\(r.lastTerm) "
                        + "commit \(r.commitIndex) applied \(r.appliedIndex) \(r.debugProgress)"
                }.joined(separator: "\n"))
    }

    func heal() throws {
        faultsEnabled = false
        blocked.removeAll()
        for i in nodes.indices where nodes[i].raft == nil { try restart(i) }
    }

    func step() throws {
        now += 1
        if faultsEnabled { try injectFaults() }
        if faultsEnabled, rng.next() % 4 == 0 {
            proposeSomewhere()
        }
        if rng.next() % 16 == 0 { readSomewhere() }
        deliver()
        for i in nodes.indices where nodes[i].raft != nil && (now + nodes[i].tickPhase) % options.tickMillis == 0 {
            nodes[i].raft!.tick()
        }
        for i in nodes.indices where nodes[i].raft != nil {
            try processReady(i)
        }
        try checkElectionSafety()
    }

    private func injectFaults() throws {
        let r = Double(rng.next() % 1_000_000) / 1_000_000
        if r < crashRate {
            let i = Int(rng.next() % UInt64(nodes.count))
            if nodes[i].raft != nil { crash(i) } else { try restart(i) }
        } else if r < crashRate * 2 {
            // Restart whoever is down, so crashed nodes come back.
            if let i = nodes.indices.first(where: { nodes[$0].raft == nil }) { try restart(i) }
        } else if r < crashRate * 2 + partitionRate {
            makePartition()
        } else if r < crashRate * 2 + partitionRate * 2 {
            blocked.removeAll()
        }
    }

    private func makePartition() {
        blocked.removeAll()
        let ids = nodes.map(\.id)
        switch rng.next() % 3 {
        case 0:  // symmetric split
            let side = Set(ids.filter { _ in rng.next() % 2 == 0 })
            for a in ids { for b in ids where side.contains(a) != side.contains(b) { blocked.insert([a, b]) } }
        case 1:  // one node cut off, one way only
            let a = ids.randomElement(using: &rng)!
            let outbound = rng.next() % 2 == 0
            for b in ids where b != a { blocked.insert(outbound ? [a, b] : [b, a]) }
        default:  // a bridge: two groups that each see one middle node, but not each other
            guard ids.count >= 3 else { return }
            let bridge = ids.randomElement(using: &rng)!
            let rest = ids.filter { $0 != bridge }
            let left = Set(rest.prefix(rest.count / 2))
            for a in rest { for b in rest where left.contains(a) != left.contains(b) { blocked.insert([a, b]) } }
        }
    }

    func crash(_ i: Int) {
        nodes[i].raft = nil
        nodes[i].lastRole = .follower
        crashes += 1
        reads = reads.filter { $0.value.node != nodes[i].id }
        pendingProposals.removeAll { $0.node == nodes[i].id }
    }

    func restart(_ i: Int) throws {
        if let sqlite = nodes[i].store as? SQLiteLogStore {
            sqlite.close()
            nodes[i].store = try makeStore(nodes[i].id)
        }
        if forgetDurableStateOnRestart { nodes[i].store = MemoryLogStore() }
        let recovered = try nodes[i].store.recover()
        nodes[i].raft = try Raft(config: raftConfig(nodes[i].id), hardState: recovered.hardState, entries: recovered.entries)
    }

    // MARK: - Clients

    private func proposeSomewhere() {
        guard let i = nodes.indices.randomElement(using: &rng), nodes[i].raft?.role == .leader else { return }
        payloadCounter += 1
        _ = propose(at: i, payload: Array("p\(options.seed)-\(payloadCounter)".utf8))
    }

    @discardableResult
    func propose(at i: Int, payload: [UInt8]) -> Proposal? {
        guard case .success(let ticket) = nodes[i].raft!.propose([payload]) else { return nil }
        let p = Proposal(node: nodes[i].id, term: ticket.term, index: ticket.firstIndex, payload: payload)
        pendingProposals.append(p)
        return p
    }

    private func readSomewhere() {
        guard let i = nodes.indices.randomElement(using: &rng), nodes[i].raft != nil else { return }
        let request = nextRead
        nextRead += 1
        // A linearizable read must observe everything committed before it started.
        if nodes[i].raft!.readIndex(request: request) == nil {
            let committedAnywhere = nodes.compactMap { $0.raft?.commitIndex }.max() ?? 0
            reads[request] = (nodes[i].id, max(UInt64(committed.count), committedAnywhere))
        }
    }

    // MARK: - Network

    private func deliver() {
        var due: [Message] = []
        network.removeAll { flight in
            if flight.at <= now {
                due.append(flight.message)
                return true
            }
            return false
        }
        for m in due {
            guard let i = nodes.firstIndex(where: { $0.id == m.to }), nodes[i].raft != nil else { continue }
            if blocked.contains([m.from, m.to]) { continue }
            nodes[i].raft!.step(m)
        }
    }

    private func send(_ m: Message) {
        if faultsEnabled && Double(rng.next() % 1000) / 1000 < dropRate { return }
        let copies = faultsEnabled && Double(rng.next() % 1000) / 1000 < duplicateRate ? 2 : 1
        for _ in 0..<copies {
            let delay = 1 + Int(rng.next() % UInt64(faultsEnabled ? maxDelay : 2))
            network.append(InFlight(at: now + delay, message: m))
        }
    }

    // MARK: - Ready

    private func processReady(_ i: Int) throws {
        while nodes[i].raft?.hasReady == true {
            let rd = nodes[i].raft!.ready()
            for m in rd.messagesBeforePersist { send(m) }
            // A crash before the batch is durable loses all of it but what was already sent.
            if faultsEnabled && rd.mustSync && Double(rng.next() % 1_000_000) / 1_000_000 < crashRate * 5 {
                crash(i)
                return
            }
            try checkAndPersist(i, rd)
            for m in rd.messages { send(m) }
            for e in rd.committedEntries { try applied(e, on: i) }
            for state in rd.readStates {
                for request in state.requests {
                    guard let read = reads.removeValue(forKey: request) else { continue }
                    if state.index < read.minIndex {
                        throw fail(
                            "stale read on node \(nodes[i].id): read index \(state.index) but \(read.minIndex) was committed before the read began"
                        )
                    }
                    readsServed += 1
                }
            }
            for request in rd.droppedReads { reads.removeValue(forKey: request) }
            nodes[i].raft!.advance(rd)
        }
        if let raft = nodes[i].raft, raft.role != nodes[i].lastRole {
            nodes[i].lastRole = raft.role
            if raft.role == .leader {
                elections += 1
                try checkLeaderCompleteness(i)
            }
        }
    }

    private func checkAndPersist(_ i: Int, _ rd: Ready) throws {
        let raft = nodes[i].raft!
        for e in rd.entries {
            let prevTerm = raft.log.term(at: e.index - 1) ?? 0
            let key = IndexTerm(index: e.index, term: e.term)
            if let seen = seenEntries[key] {
                if seen.prevTerm != prevTerm || seen.entry != e {
                    throw fail(
                        "log matching: node \(nodes[i].id) holds \(e) after term \(prevTerm), elsewhere \(seen.entry) after term \(seen.prevTerm)"
                    )
                }
            } else {
                seenEntries[key] = (prevTerm, e)
            }
        }
        if let hs = rd.hardState, let memory = nodes[i].store as? MemoryLogStore, hs.term < memory.hardState.term {
            throw fail("node \(nodes[i].id) would persist term \(hs.term) below its durable term \(memory.hardState.term)")
        }
        try nodes[i].store.persist(hardState: rd.hardState, entries: rd.entries)
    }

    private func applied(_ e: Entry, on i: Int) throws {
        let index = Int(e.index)
        if index <= committed.count {
            if committed[index - 1] != e {
                throw fail(
                    "state machine safety: node \(nodes[i].id) applied \(e) at \(index), another applied \(committed[index - 1])")
            }
        } else if index == committed.count + 1 {
            committed.append(e)
        } else {
            throw fail("node \(nodes[i].id) applied \(index) with only \(committed.count) applied anywhere before")
        }
        // Every proposal this node made at this index is now decided: committed if its term matches, lost if not.
        let id = nodes[i].id
        for proposal in pendingProposals where proposal.node == id && proposal.index == e.index && proposal.term == e.term {
            guard e.data == proposal.payload else {
                throw fail("node \(id) acknowledged \(proposal) but applied \(e)")
            }
            acknowledged.append(proposal)
        }
        pendingProposals.removeAll { $0.node == id && $0.index == e.index }
    }

    // MARK: - Checks

    private func checkElectionSafety() throws {
        for node in nodes {
            guard let raft = node.raft, raft.role == .leader else { continue }
            if let other = leaders[raft.term], other != node.id {
                throw fail("election safety: nodes \(other) and \(node.id) both led term \(raft.term)")
            }
            leaders[raft.term] = node.id
        }
    }

    /// A new leader's log holds every committed entry (so every acknowledged proposal too).
    private func checkLeaderCompleteness(_ i: Int) throws {
        let raft = nodes[i].raft!
        for e in committed where raft.log.term(at: e.index) != e.term {
            throw fail(
                "leader completeness: node \(nodes[i].id) leads term \(raft.term) without committed entry \(e.index) (term \(e.term))"
            )
        }
    }

    /// After healing, every node's applied log is the same and holds every acknowledged proposal.
    private func checkConverged() throws {
        let byIndex = Dictionary(uniqueKeysWithValues: committed.map { ($0.index, $0) })
        for p in acknowledged {
            guard let e = byIndex[p.index], e.term == p.term, e.data == p.payload else {
                throw fail("acknowledged proposal \(p) is not in the committed log")
            }
        }
        for node in nodes {
            let raft = node.raft!
            for e in committed.prefix(Int(raft.appliedIndex)) where raft.log.term(at: e.index) != e.term {
                throw fail("node \(node.id) diverges from the committed log at \(e.index)")
            }
        }
    }

    func fail(_ what: String) -> SimulationFailure {
        SimulationFailure(seed: options.seed, nodes: options.nodes, useSQLite: options.useSQLite, time: now, detail: what)
    }
}

struct SimulationFailure: Error, CustomStringConvertible {
    var seed: UInt64
    var nodes: Int
    var useSQLite: Bool
    var time: Int
    var detail: String
    var description: String {
        "simulation seed \(seed) (\(nodes) nodes\(useSQLite ? ", SQLite" : "")) failed at \(time) ms: \(detail)\n"
            + "replay: RAFT_SIM_SEED=\(seed) swift test --filter SimulationTests/replay"
    }
}
