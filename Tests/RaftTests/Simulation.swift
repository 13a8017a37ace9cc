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
        /// Membership churn (learners added and promoted, members removed, leadership transferred).
        var churn = true
        /// Snapshots and log compaction in the middle of runs.
        var snapshots = true
        /// Asynchronous storage writes (`RaftConfig.asyncStorageWrites`): a batch handed to the store becomes durable
        /// some virtual milliseconds later, in order with the others, and only then are its messages sent and is it
        /// reported; a crash loses every batch not yet durable.
        var asyncWrites = false
    }

    /// A batch handed to the store and not yet durable (`Options.asyncWrites`).
    struct PendingWrite {
        var due: Int
        var hardState: HardState?
        var entries: [Entry]
        var epoch: UInt64
        var messages: [Message]
    }

    struct InFlight {
        var at: Int
        var message: Message
        /// For InstallSnapshot: the snapshot's content (the applied sequence it covers), sent beside the message.
        var snapshotData: [Entry]?
    }

    struct SimNode {
        var id: NodeID
        var raft: Raft?
        var store: any RaftLogStore
        var tickPhase: Int
        var lastRole: Role = .follower
        /// Started at all (nodes beyond the initial voters start when they are added as learners).
        var started = true
        /// The state machine: every entry applied, in order, from index 1 (a restored snapshot included).
        var machine: [Entry] = []
        /// The durable snapshot's content, kept beside the store's metadata.
        var snapshotData: [Entry] = []
        /// A snapshot received and not yet installed, keyed by its index.
        var incomingSnapshot: (index: UInt64, data: [Entry])?
        /// With `Options.asyncWrites`: batches on their way to the disk, in order; and the last entries of those
        /// made durable, not yet reported to the protocol.
        var writes: [PendingWrite] = []
        var reports: [(index: UInt64, term: UInt64, epoch: UInt64)] = []
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
    /// Proposals followers forwarded and the leader has not placed yet, by request.
    private var forwarded: [UInt64: (node: NodeID, payload: [UInt8])] = [:]
    private(set) var forwardedPlaced = 0
    private(set) var acknowledged: [Proposal] = []
    private var payloadCounter: UInt64 = 0
    private var reads: [UInt64: (node: NodeID, minIndex: UInt64)] = [:]
    private var nextRead: UInt64 = 1
    private(set) var readsServed = 0
    private(set) var crashes = 0
    private(set) var elections = 0
    private(set) var configChanges = 0
    private(set) var transfers = 0
    private(set) var snapshotsTaken = 0
    private(set) var snapshotsInstalled = 0
    private var compactEvery = 40
    /// With `Options.asyncWrites`: the most virtual milliseconds a batch takes to become durable.
    private var writeDelay = 1
    /// The last committed membership, for the check that consecutive memberships share a majority.
    private var committedMembership: Membership

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
        committedMembership = Membership(voters: voters)
        compactEvery = [15, 40, 100].randomElement(using: &rng)!
        let seed = options.seed
        let asyncWrites = options.asyncWrites
        if asyncWrites { writeDelay = [1, 3, 10].randomElement(using: &rng)! }
        raftConfig = { id in
            // Nodes beyond the initial voters join later: they start knowing no membership.
            var c = RaftConfig(id: id, voters: id <= NodeID(voters.count) ? voters : [])
            c.promotionLag = 5
            c.preVote = preVote
            c.checkQuorum = checkQuorum
            c.maxInflightMessages = inflight
            c.maxBytesPerMessage = maxBytes
            c.randomSeed = seed &* 31 &+ id
            c.asyncStorageWrites = asyncWrites
            return c
        }
        let pool = options.churn ? options.nodes + 2 : options.nodes
        for id in (1...pool).map({ NodeID($0) }) {
            let initial = id <= NodeID(options.nodes)
            nodes.append(
                SimNode(
                    id: id, raft: initial ? try Raft(config: raftConfig(id)) : nil, store: try makeStore(id),
                    tickPhase: Int(rng.next() % UInt64(options.tickMillis)), started: initial))
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
            + "drop \(dropRate), dup \(duplicateRate), delay ≤\(maxDelay) ms, crash \(crashRate), partition \(partitionRate), "
            + "compact every \(compactEvery); \(configChanges) config changes, \(transfers) transfers, "
            + "\(snapshotsTaken) snapshots taken, \(snapshotsInstalled) installed"
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
        var proposedAt = 0
        // The leader of the highest term: a node cut off (or removed) without PreVote or CheckQuorum may still
        // believe it leads an old term, as Raft allows; clients time out on it and go elsewhere.
        func currentLeader() -> Int? {
            nodes.indices.filter { nodes[$0].raft?.role == .leader }.max { nodes[$0].raft!.term < nodes[$1].raft!.term }
        }
        while now < deadline {
            try step()
            if let p = proposed, !acknowledged.contains(p),
                now - proposedAt > 1_000
                    || nodes.first(where: { $0.id == p.node })?.raft.map({ $0.role != .leader || $0.term != p.term }) ?? true
            {
                proposed = nil  // its leader lost the term, or the client timed out: a client would retry
            }
            if proposed == nil, let leader = currentLeader() {
                proposed = propose(at: leader, payload: payload)
                proposedAt = now
            }
            if let p = proposed, let leader = currentLeader().flatMap({ nodes[$0].raft }),
                nodes.filter({ leader.membership.contains($0.id) }).allSatisfy({ ($0.raft?.appliedIndex ?? 0) >= p.index })
            {
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
        for i in nodes.indices where nodes[i].raft == nil && nodes[i].started { try restart(i) }
    }

    func step() throws {
        now += 1
        if faultsEnabled { try injectFaults() }
        if faultsEnabled, rng.next() % 4 == 0 {
            proposeSomewhere()
        }
        if rng.next() % 16 == 0 { readSomewhere() }
        if faultsEnabled && options.churn && rng.next() % 300 == 0 { churn() }
        deliver()
        for i in nodes.indices where nodes[i].raft != nil && (now + nodes[i].tickPhase) % options.tickMillis == 0 {
            nodes[i].raft!.tick()
        }
        for i in nodes.indices where nodes[i].raft != nil {
            try completeWrites(i, all: false)
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
            if nodes[i].raft != nil { crash(i) } else if nodes[i].started { try restart(i) }
        } else if r < crashRate * 2 {
            // Restart whoever is down, so crashed nodes come back.
            if let i = nodes.indices.first(where: { nodes[$0].raft == nil && nodes[$0].started }) { try restart(i) }
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
        // Some cut links are noticed as lost connections, and the hint is acted on while the peer lives.
        for j in nodes.indices where nodes[j].raft != nil {
            for peer in ids where blocked.contains([peer, nodes[j].id]) && rng.next() % 2 == 0 {
                nodes[j].raft!.peerUnreachable(peer)
            }
        }
    }

    func crash(_ i: Int) {
        nodes[i].raft = nil
        nodes[i].lastRole = .follower
        nodes[i].machine = []
        nodes[i].incomingSnapshot = nil
        nodes[i].writes = []  // never durable
        nodes[i].reports = []
        crashes += 1
        // The survivors' transports see the connection close (Raft.peerUnreachable: a hint, never needed for safety).
        for j in nodes.indices where j != i && nodes[j].raft != nil { nodes[j].raft!.peerUnreachable(nodes[i].id) }
        reads = reads.filter { $0.value.node != nodes[i].id }
        pendingProposals.removeAll { $0.node == nodes[i].id }
        forwarded = forwarded.filter { $0.value.node != nodes[i].id }
    }

    /// The config of a node starting again: a new seed, as a real shell draws one at each start, so that answers
    /// meant for its previous incarnation (still in flight) match nothing it asks now.
    private func freshConfig(_ id: NodeID) -> RaftConfig {
        var c = raftConfig(id)
        c.randomSeed ^= rng.next() | 1
        return c
    }

    func restart(_ i: Int) throws {
        if !nodes[i].writes.isEmpty { throw fail("node \(nodes[i].id) restarts with writes of its previous run still pending") }
        if let sqlite = nodes[i].store as? SQLiteLogStore {
            sqlite.close()
            nodes[i].store = try makeStore(nodes[i].id)
        }
        if forgetDurableStateOnRestart {
            nodes[i].store = MemoryLogStore()
            nodes[i].snapshotData = []
        }
        let recovered = try nodes[i].store.recover()
        nodes[i].raft = try Raft(
            config: freshConfig(nodes[i].id), hardState: recovered.hardState, entries: recovered.entries,
            snapshot: recovered.snapshot)
        // The state machine restarts from the durable snapshot, if any.
        nodes[i].machine = recovered.snapshot == nil ? [] : nodes[i].snapshotData
        if nodes[i].machine.count != Int(recovered.snapshot?.index ?? 0) {
            throw fail("node \(nodes[i].id) restarted with a snapshot at \(recovered.snapshot!.index) but \(nodes[i].machine.count) entries of content")
        }
    }

    // MARK: - Membership churn

    private func churn() {
        guard let li = nodes.indices.first(where: { nodes[$0].raft?.role == .leader }) else { return }
        let m = nodes[li].raft!.membership
        switch rng.next() % 4 {
        case 0:  // add a learner: a node that never ran, or one removed earlier (started anew with an empty disk)
            guard let j = nodes.indices.first(where: { !m.contains(nodes[$0].id) && nodes[$0].raft == nil }) else { return }
            if case .success = nodes[li].raft!.proposeConfChange(.addLearner(nodes[j].id)) {
                configChanges += 1
                nodes[j].store = MemoryLogStore()
                nodes[j].snapshotData = []
                nodes[j].machine = []
                nodes[j].started = true
                nodes[j].raft = try! Raft(config: freshConfig(nodes[j].id))
            }
        case 1:  // promote a learner (refused while it lags)
            guard let id = m.learners.randomElement(using: &rng) else { return }
            if case .success = nodes[li].raft!.proposeConfChange(.promote(id)) { configChanges += 1 }
        case 2:  // remove a member, keeping at least two voters
            let candidates = m.voters.count > 2 ? m.members : m.learners
            guard let id = candidates.randomElement(using: &rng) else { return }
            if case .success = nodes[li].raft!.proposeConfChange(.remove(id)) { configChanges += 1 }
        default:  // transfer leadership
            guard let id = m.voters.filter({ $0 != nodes[li].id }).randomElement(using: &rng) else { return }
            if nodes[li].raft!.transferLeadership(to: id) == nil { transfers += 1 }
        }
    }

    /// Nodes that were removed and know it take no further part (as an operator would stop them), but only after a
    /// while, so that a removed node that has not heard of its removal is tested for disruption.
    private func retireRemovedNodes() throws {
        guard rng.next() % 500 == 0 else { return }
        for i in nodes.indices {
            guard let raft = nodes[i].raft, raft.role == .follower, !raft.membership.contains(nodes[i].id),
                !raft.membership.voters.isEmpty
            else { continue }
            // Stopped, as a driver stops: its writes finish first (their reports reach no one). Faults or healing
            // may start it again from its disk.
            try completeWrites(i, all: true)
            nodes[i].reports = []
            nodes[i].raft = nil
        }
    }

    // MARK: - Clients

    private func proposeSomewhere() {
        guard let i = nodes.indices.randomElement(using: &rng), let raft = nodes[i].raft else { return }
        payloadCounter += 1
        let payload = Array("p\(options.seed)-\(payloadCounter)".utf8)
        if raft.role == .leader {
            _ = propose(at: i, payload: payload)
        } else if nodes[i].raft!.forwardProposal(payload, request: payloadCounter) == nil {
            // A follower hands it to its leader; once placed, it is checked as the leader's own are.
            forwarded[payloadCounter] = (nodes[i].id, payload)
        }
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
        var dueFlights: [InFlight] = []
        network.removeAll { flight in
            if flight.at <= now {
                dueFlights.append(flight)
                return true
            }
            return false
        }
        for flight in dueFlights {
            let m = flight.message
            let reachable =
                nodes.firstIndex(where: { $0.id == m.to }).map { nodes[$0].raft != nil } == true
                && !blocked.contains([m.from, m.to])
            if !reachable {
                if m.kind == .snapshot { reportSnapshotFailure(m) }
                continue
            }
            let i = nodes.firstIndex(where: { $0.id == m.to })!
            if let data = flight.snapshotData, let meta = m.snapshot { nodes[i].incomingSnapshot = (meta.index, data) }
            nodes[i].raft!.step(m)
            if m.kind == .snapshot, let s = nodes.firstIndex(where: { $0.id == m.from }), nodes[s].raft != nil {
                nodes[s].raft!.reportSnapshot(to: m.to, succeeded: true)  // as a shell does once the stream completes
            }
        }
    }

    /// The sender's shell learns that a snapshot did not arrive.
    private func reportSnapshotFailure(_ m: Message) {
        guard let s = nodes.firstIndex(where: { $0.id == m.from }), nodes[s].raft != nil else { return }
        nodes[s].raft!.reportSnapshot(to: m.to, succeeded: false)
    }

    private func send(_ m: Message, from i: Int) {
        // InstallSnapshot carries the sender's durable snapshot content.
        let data = m.kind == .snapshot ? nodes[i].snapshotData : nil
        if m.kind == .snapshot && data?.count != Int(m.snapshot!.index) {
            fatalError("node \(nodes[i].id) sends a snapshot at \(m.snapshot!.index) but holds \(data?.count ?? 0) entries of it")
        }
        if faultsEnabled && Double(rng.next() % 1000) / 1000 < dropRate {
            if m.kind == .snapshot { reportSnapshotFailure(m) }
            return
        }
        let copies = faultsEnabled && Double(rng.next() % 1000) / 1000 < duplicateRate ? 2 : 1
        for _ in 0..<copies {
            let delay = 1 + Int(rng.next() % UInt64(faultsEnabled ? maxDelay : 2))
            network.append(InFlight(at: now + delay, message: m, snapshotData: data))
        }
    }

    // MARK: - Ready

    /// With `Options.asyncWrites`: makes the node's batches durable that are due (or all of them), in order, sends
    /// what waited for each, and keeps its last entry to report.
    private func completeWrites(_ i: Int, all: Bool) throws {
        while let w = nodes[i].writes.first, all || w.due <= now {
            nodes[i].writes.removeFirst()
            try persist(i, hardState: w.hardState, entries: w.entries)
            for m in w.messages { send(m, from: i) }
            if let last = w.entries.last { nodes[i].reports.append((last.index, last.term, w.epoch)) }
        }
    }

    private func processReady(_ i: Int) throws {
        if nodes[i].raft != nil {
            for r in nodes[i].reports { nodes[i].raft!.persisted(through: r.index, term: r.term, epoch: r.epoch) }
            nodes[i].reports.removeAll()
        }
        while nodes[i].raft?.hasReady == true {
            let rd = nodes[i].raft!.ready()
            for m in rd.messagesBeforePersist { send(m, from: i) }
            // A crash before the batch is durable loses all of it but what was already sent.
            if faultsEnabled && rd.mustSync && Double(rng.next() % 1_000_000) / 1_000_000 < crashRate * 5 {
                crash(i)
                return
            }
            try checkLogMatching(i, rd.entries)
            if rd.persistInline {
                try completeWrites(i, all: true)
                if let meta = rd.snapshot { try installSnapshot(i, meta, hardState: rd.hardState) }
                try persist(i, hardState: rd.hardState, entries: rd.entries)
                for m in rd.messages { send(m, from: i) }
            } else if rd.entries.isEmpty && rd.hardState == nil && nodes[i].writes.isEmpty {
                for m in rd.messages { send(m, from: i) }
            } else {
                nodes[i].writes.append(
                    PendingWrite(
                        due: now + Int(rng.next() % UInt64(writeDelay)), hardState: rd.hardState, entries: rd.entries,
                        epoch: rd.epoch, messages: rd.messages))
            }
            for placed in rd.proposalsPlaced {
                guard let f = forwarded.removeValue(forKey: placed.request), f.node == nodes[i].id else { continue }
                guard placed.index > UInt64(nodes[i].machine.count) else { continue }  // applied before the answer
                pendingProposals.append(Proposal(node: f.node, term: placed.term, index: placed.index, payload: f.payload))
                forwardedPlaced += 1
            }
            for request in rd.proposalsRefused + rd.proposalsUnknown { forwarded.removeValue(forKey: request) }
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
        if let raft = nodes[i].raft, raft.role == .leader {
            let uncommittedConfigs = raft.log.entries.filter { $0.index > raft.commitIndex && $0.kind == .config }
            if uncommittedConfigs.count > 1 {
                throw fail("leader \(nodes[i].id) has \(uncommittedConfigs.count) configuration changes in flight")
            }
        }
        if options.snapshots, let raft = nodes[i].raft, raft.appliedIndex >= (raft.snapshot?.index ?? 0) + UInt64(compactEvery),
            rng.next() % 4 == 0
        {
            try takeSnapshot(i)
        }
        if faultsEnabled { try retireRemovedNodes() }
    }

    /// The state machine's content up to the applied index becomes durable, then the log before it is dropped.
    private func takeSnapshot(_ i: Int) throws {
        try completeWrites(i, all: true)  // the store takes the snapshot after the batches handed to it
        let index = nodes[i].raft!.appliedIndex
        let data = Array(nodes[i].machine.prefix(Int(index)))
        guard let meta = nodes[i].raft!.compact(through: index) else { return }
        nodes[i].snapshotData = data
        try nodes[i].store.saveSnapshot(meta, replacingLog: false, hardState: nil)
        snapshotsTaken += 1
    }

    private func installSnapshot(_ i: Int, _ meta: SnapshotMetadata, hardState: HardState?) throws {
        guard let incoming = nodes[i].incomingSnapshot, incoming.index == meta.index else {
            throw fail("node \(nodes[i].id) installs a snapshot at \(meta.index) it never received")
        }
        for e in incoming.data where Int(e.index) > committed.count || committed[Int(e.index) - 1] != e {
            throw fail("node \(nodes[i].id) received a snapshot whose entry \(e.index) was never committed as such")
        }
        nodes[i].snapshotData = incoming.data
        try nodes[i].store.saveSnapshot(meta, replacingLog: true, hardState: hardState)
        nodes[i].machine = incoming.data
        nodes[i].incomingSnapshot = nil
        snapshotsInstalled += 1
    }

    /// Log matching, checked as the batch is handed to the store (the log may change before it is durable).
    private func checkLogMatching(_ i: Int, _ entries: [Entry]) throws {
        let raft = nodes[i].raft!
        for e in entries {
            guard let prevTerm = raft.log.term(at: e.index - 1) else { continue }
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
    }

    private func persist(_ i: Int, hardState: HardState?, entries: [Entry]) throws {
        if let hs = hardState, let memory = nodes[i].store as? MemoryLogStore, hs.term < memory.hardState.term {
            throw fail("node \(nodes[i].id) would persist term \(hs.term) below its durable term \(memory.hardState.term)")
        }
        try nodes[i].store.persist(hardState: hardState, entries: entries)
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
            if e.kind == .config {
                let next = try Membership(decoding: e.data)
                if Self.majoritiesCanBeDisjoint(committedMembership, next) {
                    throw fail("committed membership \(next) can form a majority disjoint from one of \(committedMembership)")
                }
                committedMembership = next
            }
        } else {
            throw fail("node \(nodes[i].id) applied \(index) with only \(committed.count) applied anywhere before")
        }
        if nodes[i].machine.count + 1 != index {
            throw fail("node \(nodes[i].id) applied \(index) after \(nodes[i].machine.count) entries")
        }
        nodes[i].machine.append(e)
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
        for e in committed where e.index > raft.log.offset && raft.log.term(at: e.index) != e.term {
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
            guard let raft = node.raft else { continue }
            if node.machine != Array(committed.prefix(node.machine.count)) {
                throw fail("node \(node.id)'s state machine diverges from the committed log")
            }
            for e in committed.prefix(Int(raft.appliedIndex)) where e.index > raft.log.offset && raft.log.term(at: e.index) != e.term {
                throw fail("node \(node.id) diverges from the committed log at \(e.index)")
            }
        }
    }

    /// Whether a majority of `a` and a majority of `b` can have no member in common.
    static func majoritiesCanBeDisjoint(_ a: Membership, _ b: Membership) -> Bool {
        let sa = Set(a.voters)
        let sb = Set(b.voters)
        let needA = max(0, a.quorum - sa.subtracting(sb).count)
        let needB = max(0, b.quorum - sb.subtracting(sa).count)
        return needA + needB <= sa.intersection(sb).count
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
