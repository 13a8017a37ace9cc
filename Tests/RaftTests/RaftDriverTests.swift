import Foundation
import Logging
import Synchronization
import CircuitTestSupport
import Testing

@testable import CircuitRaft

/// Counts applied entries and answers each proposal with its index.
private final class IndexEcho: RaftStateMachine {
    /// Applied entries, in order; a restored snapshot puts back the ones it covers.
    private(set) var applied: [Entry] = []
    func apply(_ entry: Entry) -> [UInt8] {
        applied.append(entry)
        return withUnsafeBytes(of: entry.index.littleEndian) { Array($0) }
    }
    func snapshot() -> @Sendable () throws -> [UInt8] {
        let copy = applied
        return {
            var out: [UInt8] = []
            for e in copy {
                for v in [e.index, e.term, UInt64(e.data.count)] { withUnsafeBytes(of: v.littleEndian) { out += $0 } }
                out += e.data
            }
            return out
        }
    }
    func restore(_ payload: [UInt8]) throws {
        var entries: [Entry] = []
        var at = 0
        func word() -> UInt64 {
            defer { at += 8 }
            return payload[at..<at + 8].withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        }
        while at < payload.count {
            let index = word(), term = word(), count = Int(word())
            entries.append(Entry(term: term, index: index, data: Array(payload[at..<at + count])))
            at += count
        }
        applied = entries
    }
}

/// Counts applied entries; its snapshot is large (40,000 bytes of padding after the count).
private final class Bulky: RaftStateMachine {
    private(set) var count: UInt64 = 0
    func apply(_ entry: Entry) -> [UInt8] {
        count += 1
        return []
    }
    func snapshot() -> @Sendable () throws -> [UInt8] {
        let n = count
        return { withUnsafeBytes(of: n.littleEndian) { Array($0) } + [UInt8](repeating: 0, count: 40_000) }
    }
    func restore(_ payload: [UInt8]) throws {
        count = payload.prefix(8).withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
    }
}

/// A driver's turns on a serial dispatch queue: the executor mode a daemon uses (there, a NIO event loop).
private final class QueueExecutor: RaftLoopExecutor, @unchecked Sendable {
    private let queue: DispatchQueue
    private let key = DispatchSpecificKey<Bool>()
    /// How many pieces of work were given to `execute`.
    let executed = Atomic(0)
    /// How many of them have started to run.
    let started = Atomic(0)

    init(_ label: String) {
        queue = DispatchQueue(label: label)
        queue.setSpecific(key: key, value: true)
    }

    func execute(_ work: @escaping @Sendable () -> Void) {
        executed.add(1, ordering: .relaxed)
        queue.async { [self] in
            started.add(1, ordering: .sequentiallyConsistent)
            work()
        }
    }

    func every(_ interval: Duration, _ work: @escaping @Sendable () -> Void) -> any RaftLoopTimer {
        let timer = DispatchSource.makeTimerSource(queue: queue)
        let nanos = Int(interval.components.seconds) * 1_000_000_000 + Int(interval.components.attoseconds / 1_000_000_000)
        timer.schedule(deadline: .now() + .nanoseconds(nanos), repeating: .nanoseconds(nanos))
        timer.setEventHandler(handler: work)
        timer.resume()
        return Timer(source: timer)
    }

    var isCurrent: Bool { DispatchQueue.getSpecific(key: key) == true }

    private struct Timer: RaftLoopTimer, @unchecked Sendable {
        let source: any DispatchSourceTimer
        func cancel() { source.cancel() }
    }
}

/// How a driver's loop runs: on a thread of its own, or as turns on an executor.
enum LoopMode: String, CaseIterable, Sendable, CustomTestStringConvertible {
    /// The loop on a thread of its own; on an executor; on an executor with asynchronous storage writes (as a daemon).
    case thread, executor, asyncWrites
    var testDescription: String { rawValue }
    func apply(_ options: inout RaftDriver.Options, _ id: NodeID) {
        if self != .thread { options.executor = QueueExecutor("raft-\(id)") }
    }
    func config(id: NodeID, voters: [NodeID]) -> RaftConfig {
        var config = RaftConfig(id: id, voters: voters)
        config.asyncStorageWrites = self == .asyncWrites
        return config
    }
}

/// Real threads, real SQLite files, an in-process transport.
@Suite("RaftDriver on real threads and SQLite stores", .serialized)
struct RaftDriverTests {
    let logger = Logger(label: "driver-test")

    /// Started drivers of `ids`, each with a SQLite store in `dir` unless `store` gives one; `configure` may change
    /// each node's options and Raft configuration.
    private func makeCluster(
        _ dir: String, ids: [NodeID], transport: LocalTransport, tick: Duration = .milliseconds(10),
        checkQuorum: Bool = true, mode: LoopMode = .thread, store custom: ((NodeID) -> (any RaftLogStore)?)? = nil,
        configure: (NodeID, inout RaftDriver.Options, inout RaftConfig) -> Void = { _, _, _ in }
    ) throws -> [NodeID: RaftDriver] {
        var drivers: [NodeID: RaftDriver] = [:]
        for id in ids {
            var options = RaftDriver.Options()
            options.tickInterval = tick
            mode.apply(&options, id)
            var config = mode.config(id: id, voters: ids)
            config.checkQuorum = checkQuorum
            configure(id, &options, &config)
            let store = try custom?(id) ?? SQLiteLogStore(path: "\(dir)/\(id).sqlite", logger: logger)
            let driver = try RaftDriver(
                config: config, store: store, stateMachine: IndexEcho(),
                transport: transport.endpoint(for: id), options: options, logger: logger)
            transport.register(driver)
            drivers[id] = driver
        }
        for d in drivers.values { d.start() }
        return drivers
    }

    private func temporaryFolder() throws -> String { try CircuitTestSupport.temporaryFolder("raft-driver") }

    /// 10 ms ticks, and a snapshot once `entries` entries were applied since the last.
    private func snapshotting(every entries: UInt64) -> RaftDriver.Options {
        var options = RaftDriver.Options()
        options.tickInterval = .milliseconds(10)
        options.snapshotEntries = entries
        return options
    }

    @Test("proposals commit on a quorum, through the leader or handed to it by a follower; reads are linearizable barriers on the leader and on a follower", arguments: LoopMode.allCases)
    func proposeAndRead(_ mode: LoopMode) async throws {
        let dir = try temporaryFolder()
        let transport = LocalTransport()
        let drivers = try makeCluster(dir, ids: [1, 2, 3], transport: transport, mode: mode)
        defer { for d in drivers.values { d.stop() } }
        try await waitFor("a leader") { drivers.values.contains { $0.status.role == .leader } }
        let leader = try #require(drivers.values.first { $0.status.role == .leader })
        let follower = try #require(drivers.values.first { $0.status.role != .leader })

        let answers = try await withThrowingTaskGroup(of: UInt64.self) { group in
            for i in 0..<50 {
                group.addTask {
                    let bytes = try await leader.propose(Array("v\(i)".utf8))
                    return bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
                }
            }
            var all: [UInt64] = []
            for try await a in group { all.append(a) }
            return all
        }
        #expect(Set(answers).count == 50, "every proposal got its own index")

        // A follower hands its proposal to the leader and answers once it has applied it itself.
        try await waitFor("the follower to know the leader") { follower.status.leader == leader.id }
        await #expect(throws: RaftDriverError.refused(.notLeader(leader: leader.id))) {
            _ = try await follower.propose(Array("no".utf8))
        }
        let forwarded = try await follower.propose(Array("via follower".utf8), forward: true)
        #expect(forwarded.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) } > answers.max()!)
        let readAt = try await leader.readBarrier()
        #expect(readAt >= answers.max()!)
        // A follower's barrier asks the leader for its index and returns once it has applied that far.
        #expect(try await follower.readBarrier() >= answers.max()!)
    }

    @Test("a caller that gives up is answered at once: a proposal that cannot commit and a read that cannot be confirmed end with CancellationError, and the node serves on", .timeLimit(.minutes(1)), arguments: LoopMode.allCases)
    func cancelledCalls(_ mode: LoopMode) async throws {
        let dir = try temporaryFolder()
        let transport = LocalTransport()
        // Without CheckQuorum the cut-off leader leads on forever: nothing but the cancellation can answer its callers.
        let drivers = try makeCluster(dir, ids: [1, 2, 3], transport: transport, checkQuorum: false, mode: mode)
        defer { for d in drivers.values { d.stop() } }
        try await waitFor("a leader", timeout: .seconds(20)) { drivers.values.contains { $0.status.role == .leader } }
        let leader = try #require(drivers.values.first { $0.status.role == .leader })
        _ = try await leader.propose(Array("first".utf8))
        let term = leader.status.term
        for id in drivers.keys where id != leader.id { transport.setDown(id, true) }

        let proposal = Task { try await leader.propose(Array("stuck".utf8)) }
        let read = Task { try await leader.readBarrier() }
        proposal.cancel()
        read.cancel()
        await #expect(throws: CancellationError.self) { _ = try await proposal.value }
        await #expect(throws: CancellationError.self) { _ = try await read.value }
        #expect(leader.status.role == .leader && leader.status.term == term, "answered by the cancellation, not by a step-down")

        // The followers back: the cluster commits again (the given-up proposal may or may not be in the log). The
        // followers may have elected one of them meanwhile, which the old leader learns only now: a proposal to it
        // may end with a step-down, and goes to whoever leads then.
        for id in drivers.keys { transport.setDown(id, false) }
        try await eventually("a proposal committed once the followers were back", timeout: .seconds(20)) {
            guard let now = drivers.values.first(where: { $0.status.role == .leader }) else { return false }
            return (try? await now.propose(Array("after".utf8))) != nil
        }
    }

    @Test("a follower whose read index was confirmed but which cannot apply that far fails the read after its limit, naming how far it got", .timeLimit(.minutes(1)), arguments: LoopMode.allCases)
    func confirmedReadBound(_ mode: LoopMode) async throws {
        let dir = try temporaryFolder()
        let transport = LocalTransport()
        // Ticks of 100 ms (elections after 1 to 2 s of silence): the bound is what fails the read, and a busy machine
        // delaying heartbeats for 100 ms or more must not start an election that ends it first (seen with 10 ms ticks
        // in a full run of the suite: the follower, a pre-candidate, answered that no leader is known).
        let drivers = try makeCluster(
            dir, ids: [1, 2, 3], transport: transport, tick: .milliseconds(100), mode: mode,
            configure: { _, options, _ in options.readApplyLimit = .milliseconds(300) })
        defer { for d in drivers.values { d.stop() } }
        try await waitFor("a leader", timeout: .seconds(20)) { drivers.values.contains { $0.status.role == .leader } }
        let leader = try #require(drivers.values.first { $0.status.role == .leader })
        let follower = try #require(drivers.values.first { $0.status.role != .leader })
        try await waitFor("the follower to know the leader") { follower.status.leader == leader.id }
        _ = try await leader.propose(Array("seen".utf8))
        #expect(try await follower.readBarrier() >= 1, "a read that can be served is")

        // The follower gets heartbeats and read answers, but no entries: it cannot apply what the leader commits.
        let cut = follower.id
        transport.setFilter { !($0.to == cut && $0.kind == .append) }
        let committed = UInt64(littleEndian: try await leader.propose(Array("unseen".utf8)).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })
        let applied = follower.status.appliedIndex
        #expect(applied < committed)
        await #expect(throws: RaftDriverError.behind(index: committed, applied: applied)) { _ = try await follower.readBarrier() }
        #expect(follower.status.role == .follower && follower.status.leader == leader.id, "failed by the bound, not by a change of leader")

        transport.setFilter(nil)
        #expect(try await follower.readBarrier() >= committed, "caught up, it serves reads again")
    }

    @Test("on an executor, a message that arrives before start() waits in the inbox: no turn runs until the driver starts")
    func noTurnBeforeStart() async throws {
        let dir = try temporaryFolder()
        let executor = QueueExecutor("raft-early")
        var options = RaftDriver.Options()
        options.executor = executor
        let driver = try RaftDriver(
            config: RaftConfig(id: 1, voters: [1, 2, 3]), store: try SQLiteLogStore(path: "\(dir)/1.sqlite", logger: logger),
            stateMachine: IndexEcho(), transport: LocalTransport().endpoint(for: 1), options: options, logger: logger)
        defer { driver.stop() }
        driver.receive([Message(kind: .heartbeat, from: 2, to: 1, term: 7)])
        #expect(executor.executed.load(ordering: .relaxed) == 0, "a turn was queued before start()")
        #expect(driver.status.term == 0)
        driver.start()
        // Term 7 comes only from that heartbeat (alone, the driver cannot win a pre-vote, so it never raises its own
        // term). Not also `leader == 2`: on a loaded machine the election timeout may pass before the check runs,
        // and the follower, hearing nothing more, forgets its leader.
        try await waitFor("the early heartbeat stepped once started") { driver.status.term == 7 }
    }

    @Test("a killed leader is replaced, the survivors keep committing, and the restarted node catches up from disk", arguments: LoopMode.allCases)
    func failoverAndRecovery(_ mode: LoopMode) async throws {
        let dir = try temporaryFolder()
        let transport = LocalTransport()
        var drivers = try makeCluster(dir, ids: [1, 2, 3], transport: transport, mode: mode)
        defer { for d in drivers.values { d.stop() } }
        try await waitFor("a leader") { drivers.values.contains { $0.status.role == .leader } }
        let first = try #require(drivers.values.first { $0.status.role == .leader })
        for i in 0..<20 { _ = try await first.propose(Array("a\(i)".utf8)) }
        let committedBefore = first.status.commitIndex

        transport.unregister(first.id)
        first.stop()
        drivers.removeValue(forKey: first.id)
        try await waitFor("a new leader") { drivers.values.contains { $0.status.role == .leader } }
        let second = try #require(drivers.values.first { $0.status.role == .leader })
        #expect(second.status.term > 1)
        for i in 0..<20 { _ = try await second.propose(Array("b\(i)".utf8)) }
        #expect(second.status.commitIndex > committedBefore)

        // Restart the old leader from its store: it must recover its log and catch up.
        var options = RaftDriver.Options()
        options.tickInterval = .milliseconds(10)
        mode.apply(&options, first.id)
        let machine = IndexEcho()
        let store = try SQLiteLogStore(path: "\(dir)/\(first.id).sqlite", logger: logger)
        #expect(try store.recover().entries.count >= Int(committedBefore), "the old leader's log survived on disk")
        let restarted = try RaftDriver(
            config: mode.config(id: first.id, voters: [1, 2, 3]), store: store, stateMachine: machine,
            transport: transport.endpoint(for: first.id), options: options, logger: logger)
        transport.register(restarted)
        restarted.start()
        drivers[first.id] = restarted
        let target = second.status.commitIndex
        try await waitFor("the restarted node to catch up") { restarted.status.appliedIndex >= target }
        #expect(machine.applied.filter { $0.kind == .normal }.count >= 40)
    }

    @Test("after a large snapshot the next waits until the log since holds a quarter of its bytes, not only snapshotEntries entries", arguments: LoopMode.allCases)
    func snapshotsWaitForAQuarter(_ mode: LoopMode) async throws {
        let dir = try temporaryFolder()
        let transport = LocalTransport()
        var options = snapshotting(every: 10)
        mode.apply(&options, 1)
        let driver = try RaftDriver(
            config: mode.config(id: 1, voters: [1]), store: try SQLiteLogStore(path: "\(dir)/1.sqlite", logger: logger),
            stateMachine: Bulky(), transport: transport.endpoint(for: 1),
            snapshots: try SnapshotFiles(directory: "\(dir)/1-snapshots", logger: logger), options: options, logger: logger)
        transport.register(driver)
        driver.start()
        defer { driver.stop() }
        try await waitFor("a leader") { driver.status.role == .leader }
        let entry = [UInt8](repeating: 7, count: 76)  // 100 bytes with the entry's header
        for _ in 0..<12 { _ = try await driver.propose(entry) }
        try await waitFor("the first snapshot") { driver.status.snapshotIndex > 0 && !driver.status.snapshotting }
        let first = driver.status.snapshotIndex
        // Its 40,008 bytes ask for 10,002 bytes of entries before the next, about 100 entries: 60 are not enough.
        for _ in 0..<60 { _ = try await driver.propose(entry) }
        #expect(driver.status.snapshotIndex == first && !driver.status.snapshotting, "a snapshot after only 60 entries")
        for _ in 0..<60 { _ = try await driver.propose(entry) }
        try await waitFor("the second snapshot") { driver.status.snapshotIndex > first }
        #expect(driver.status.snapshotIndex - first >= 100)
    }

    @Test("snapshots compact the log; a new learner catches up by a streamed InstallSnapshot; membership changes and transfers work end to end", arguments: LoopMode.allCases)
    func snapshotsAndMembership(_ mode: LoopMode) async throws {
        let dir = try temporaryFolder()
        let transport = LocalTransport()
        var options = snapshotting(every: 25)
        options.snapshotChunkBytes = 100  // many chunks, to exercise the window
        options.snapshotWindow = 3
        var machines: [NodeID: IndexEcho] = [:]
        func start(_ id: NodeID, voters: [NodeID]) throws -> RaftDriver {
            var options = options
            mode.apply(&options, id)
            let machine = IndexEcho()
            machines[id] = machine
            let driver = try RaftDriver(
                config: mode.config(id: id, voters: voters),
                store: try SQLiteLogStore(path: "\(dir)/\(id).sqlite", logger: logger), stateMachine: machine,
                transport: transport.endpoint(for: id),
                snapshots: try SnapshotFiles(directory: "\(dir)/\(id)-snapshots", logger: logger), options: options,
                logger: logger)
            transport.register(driver)
            driver.start()
            return driver
        }
        var drivers: [NodeID: RaftDriver] = [:]
        for id in [NodeID(1), 2, 3] { drivers[id] = try start(id, voters: [1, 2, 3]) }
        defer { for d in drivers.values { d.stop() } }
        func leader() -> RaftDriver? { drivers.values.first { $0.status.role == .leader && $0.status.running } }
        func leading() async throws -> RaftDriver { try await waitForSome("a leader", leader) }
        /// `call` on the leader; again on the next one while leadership moves under it (with 10 ms ticks, an election
        /// can come at any time on a busy machine): refused as not the leader, or not yet ready, or the outcome
        /// unknown. `done`, asked of the leader before each try, tells a change an earlier try made after all (a
        /// proposal tried again may be in the log twice, which this test's checks allow).
        func onLeader<T>(done: (RaftDriver) -> T? = { _ in nil }, _ call: (RaftDriver) async throws -> T) async throws -> T {
            let deadline = ContinuousClock.now + .seconds(30)
            while true {
                let leader = try await leading()
                if let made = done(leader) { return made }
                do {
                    return try await call(leader)
                } catch let error as RaftDriverError where ContinuousClock.now < deadline {
                    switch error {
                    case .refused(.notLeader), .refused(.leaderNotReady), .refused(.transferInProgress),
                        .refused(.configChangeInProgress), .outcomeUnknown:
                        try await Task.sleep(for: .milliseconds(5))  // a back-off between tries, not a wait for a state
                    default:
                        throw error
                    }
                }
            }
        }
        func members(_ leader: RaftDriver) -> Membership { leader.status.membership }
        try await waitFor("a leader") { leader() != nil }
        for i in 0..<100 { _ = try await onLeader { try await $0.propose(Array("e\(i)".utf8)) } }
        try await waitFor("a snapshot on every node") { drivers.values.allSatisfy { $0.status.snapshotIndex > 0 } }

        // A fresh learner joins: the entries it needs are compacted away, so it gets the snapshot, then the tail.
        drivers[4] = try start(4, voters: [])
        try await onLeader(done: { members($0).learners.contains(4) ? () : nil }) { try await $0.changeMembership(.addLearner(4)) }
        _ = try await onLeader { try await $0.propose(Array("after".utf8)) }
        let target = (try await leading()).status.commitIndex
        try await waitFor("the learner to catch up") { drivers[4]!.status.appliedIndex >= target }
        #expect(drivers[4]!.status.snapshotsInstalled >= 1, "the learner started from a streamed snapshot")
        let reference = machines[(try await leading()).id]!.applied
        #expect(machines[4]!.applied == Array(reference.prefix(machines[4]!.applied.count)))
        #expect(machines[4]!.applied.count >= 101)

        // Promote it, remove node 3, move leadership to it.
        try await onLeader(done: { members($0).voters.contains(4) ? () : nil }) { try await $0.changeMembership(.promote(4)) }
        try await onLeader(done: { members($0).voters.contains(3) ? nil : () }) { try await $0.changeMembership(.remove(3)) }
        #expect((try await leading()).status.membership == Membership(voters: [1, 2, 4]))
        let to = try await onLeader(done: { $0.id == 4 ? 4 : nil }) { try await $0.transferLeadership(to: 4) }
        #expect(to == 4)
        try await waitFor("node 4 to lead") { drivers[4]!.status.role == .leader }
        _ = try await onLeader { try await $0.propose(Array("led by 4".utf8)) }

        // Restart node 1 from its snapshot plus log tail: its state machine comes back whole.
        drivers[1]!.stop()
        transport.unregister(1)
        drivers[1] = try start(1, voters: [1, 2, 3])
        let commit = drivers[4]!.status.commitIndex
        try await waitFor("node 1 to catch up after restart") { drivers[1]!.status.appliedIndex >= commit }
        #expect(machines[1]!.applied == Array(machines[4]!.applied.prefix(machines[1]!.applied.count)))
        #expect(machines[1]!.applied.map(\.data).contains(Array("led by 4".utf8)))
    }

    @Test("a leader that shuts down gracefully hands over: a successor leads before any election timeout could fire", arguments: LoopMode.allCases)
    func gracefulShutdownTransfers(_ mode: LoopMode) async throws {
        let dir = try temporaryFolder()
        let transport = LocalTransport()
        // Elections only after 1 to 2 s of silence.
        let drivers = try makeCluster(dir, ids: [1, 2, 3], transport: transport, tick: .milliseconds(100), mode: mode)
        defer { for d in drivers.values { d.stop() } }
        drivers[1]!.campaign()
        try await waitFor("node 1 to lead") { drivers[1]!.status.role == .leader }
        _ = try await drivers[1]!.propose([1])
        let term = drivers[1]!.status.term
        await drivers[1]!.shutdown()
        #expect(!drivers[1]!.status.running)
        // Without the hand-over, the others would wait at least 1 s (10 ticks of 100 ms) before campaigning.
        try await waitFor("a successor", timeout: .milliseconds(900)) {
            drivers.values.contains { $0.status.role == .leader && $0.status.running }
        }
        let successor = try #require(drivers.values.first { $0.status.role == .leader && $0.status.running })
        #expect(successor.status.term == term + 1)
    }

    @Test("a store that fails stops the node loudly and fails what was waiting", arguments: LoopMode.allCases)
    func storageFailureStops(_ mode: LoopMode) async throws {
        let store = FailingStore()
        var options = RaftDriver.Options()
        mode.apply(&options, 1)
        let driver = try RaftDriver(
            config: mode.config(id: 1, voters: [1]), store: store, stateMachine: IndexEcho(),
            transport: LocalTransport().endpoint(for: 1), options: options, logger: logger)
        driver.start()
        defer { driver.stop() }
        driver.campaign()
        try await waitFor("the node to stop") { !driver.status.running }
        #expect(driver.status.failure?.contains("disk on fire") == true)
        await #expect(throws: RaftDriverError.stopped) { _ = try await driver.propose([1]) }
    }

    /// The leader's background write of an entry is held in the store while a vote request of a higher term
    /// reaches it: the turn that handles it must persist the new term inline, so it waits for the writer; then the
    /// held write fails. Writing the term after that failure would put durable state over a hole in the log (and
    /// answer the vote as if the log were whole); the node must stop instead, with nothing written or sent after.
    @Test("a background write that fails while an inline write waits for it stops the node before the inline write")
    func writerFailureDuringInlineWait() async throws {
        let dir = try temporaryFolder()
        let transport = LocalTransport()
        let gated = GatedStore(try SQLiteLogStore(path: "\(dir)/1.sqlite", logger: logger))
        let loop1 = QueueExecutor("raft-1")
        // No election of its own within the test; node 2's campaign raises the term at once (no PreVote), and the
        // leader hears its vote request (no lease).
        let drivers = try makeCluster(
            dir, ids: [1, 2, 3], transport: transport, tick: .milliseconds(100), checkQuorum: false, mode: .asyncWrites,
            store: { $0 == 1 ? gated : nil }
        ) { id, options, config in
            if id == 1 { options.executor = loop1 }
            config.preVote = false
        }
        defer { for d in drivers.values { d.stop() } }
        drivers[1]!.campaign()
        try await waitFor("node 1 to lead") { drivers[1]!.status.role == .leader }
        _ = try await drivers[1]!.propose([1])

        gated.arm()
        let leader = drivers[1]!
        let held = Task { try await leader.propose([2]) }
        try await waitFor("node 1's write of the entry to reach the store") { gated.entered }
        // The turns of node 1's loop that began before its vote request arrived, and what node 1 sends meanwhile.
        let turnsBeforeVote = Mutex<Int?>(nil)
        let answeredVote = Atomic(false)
        transport.setFilter { m in
            if m.kind == .vote, m.to == 1 { turnsBeforeVote.withLock { $0 = $0 ?? loop1.started.load(ordering: .sequentiallyConsistent) } }
            if m.kind == .voteResponse, m.from == 1 { answeredVote.store(true, ordering: .relaxed) }
            return true
        }
        drivers[2]!.campaign()
        // A turn that began after the request arrived holds it, and waits for the writer before it can answer.
        try await waitFor("node 1's loop to take the vote request") {
            turnsBeforeVote.withLock { $0 }.map { loop1.started.load(ordering: .sequentiallyConsistent) > $0 } ?? false
        }
        gated.open()
        try await waitFor("node 1 to stop") { !drivers[1]!.status.running }
        #expect(drivers[1]!.status.failure?.contains("disk on fire") == true)
        #expect(gated.writesAfterFailure == 0, "node 1 wrote to its log after a write before it had failed")
        let answered = answeredVote.load(ordering: .relaxed)
        #expect(!answered, "node 1 answered a vote over a hole in its log")
        await #expect(throws: (any Error).self) { _ = try await held.value }
        // The others go on: one of them leads and commits. Node 2, whose campaign began it, if node 3 votes for it;
        // node 3, in a later election, if it had received the held entry from node 1 and node 2 had not (then node 3
        // refuses node 2's vote: its log is ahead).
        try await waitFor("node 2 or node 3 to lead") { [2, 3].contains { drivers[$0]!.status.role == .leader } }
        let next = try #require([2, 3].first { drivers[$0]!.status.role == .leader })
        _ = try await drivers[next]!.propose([3])
    }
}

/// What the failing stores below throw.
private struct DiskOnFire: Error, CustomStringConvertible { var description: String { "disk on fire" } }

/// A SQLite store whose next write of entries, once armed, holds the writer until released and then fails; it
/// counts the writes asked of it after that failure.
private final class GatedStore: RaftLogStore, @unchecked Sendable {
    private let inner: SQLiteLogStore
    private let release = DispatchSemaphore(value: 0)
    private let state = Mutex((armed: false, entered: false, failed: false, writesAfterFailure: 0))

    init(_ inner: SQLiteLogStore) { self.inner = inner }

    func arm() { state.withLock { $0.armed = true } }
    var entered: Bool { state.withLock { $0.entered } }
    var writesAfterFailure: Int { state.withLock { $0.writesAfterFailure } }
    func open() { release.signal() }

    var syncCount: Int { inner.syncCount }
    func recover() throws -> RecoveredLog { try inner.recover() }
    func persist(hardState: HardState?, entries: [Entry]) throws {
        let (gated, failed) = state.withLock { s -> (Bool, Bool) in
            if s.failed { s.writesAfterFailure += 1 }
            guard s.armed, !entries.isEmpty else { return (false, s.failed) }
            s.armed = false
            s.entered = true
            return (true, false)
        }
        if gated {
            release.wait()
            state.withLock { $0.failed = true }
            throw DiskOnFire()
        }
        if failed { throw DiskOnFire() }
        try inner.persist(hardState: hardState, entries: entries)
    }
    func entries(from: UInt64, to: UInt64, maxBytes: Int) throws -> [Entry] {
        try inner.entries(from: from, to: to, maxBytes: maxBytes)
    }
    func saveSnapshot(_ snapshot: SnapshotMetadata, replacingLog: Bool, hardState: HardState?) throws {
        try state.withLock { s in
            if s.failed {
                s.writesAfterFailure += 1
                throw DiskOnFire()
            }
        }
        try inner.saveSnapshot(snapshot, replacingLog: replacingLog, hardState: hardState)
    }
    func close() { inner.close() }
}

/// A store whose every write fails.
private final class FailingStore: RaftLogStore {
    var syncCount: Int { 0 }
    func recover() throws -> RecoveredLog { RecoveredLog(hardState: HardState(), entries: []) }
    func persist(hardState: HardState?, entries: [Entry]) throws { throw DiskOnFire() }
    func entries(from: UInt64, to: UInt64, maxBytes: Int) throws -> [Entry] { [] }
    func saveSnapshot(_ snapshot: SnapshotMetadata, replacingLog: Bool, hardState: HardState?) throws { throw DiskOnFire() }
    func close() {}
}

@Suite("the main job")
struct DemoTests {
    @Test("`circuit demo` runs a 3-node cluster through a leader kill and restart and reports identical replicas")
    func demoRuns() async throws {
        let binary = try #require(circuitBinary(), "the circuit executable was not built next to the tests")
        // The waits block: off the cooperative pool, which the other suites' awaits share.
        let (status, output) = try await onOwnThread {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: binary)
            process.arguments = ["demo", "--entries", "100"]
            let pipe = Pipe()
            process.standardOutput = pipe
            try process.run()
            let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            return (process.terminationStatus, output)
        }
        #expect(status == 0, "\(output)")
        #expect(output.contains("took over"))
        #expect(output.contains("hands over first"))
        #expect(output.contains("ok: 201 entries acknowledged; all 3 replicas applied the same log"))
    }
}
