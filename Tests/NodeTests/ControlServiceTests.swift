import CircuitNode
import CircuitRaft
import CircuitStateMachine
import CircuitTestSupport
import Logging
import Synchronization
import Testing

/// A clock the test moves by hand, for the leases.
private final class ManualClock: Sendable {
    private let millis = Mutex<UInt64>(0)
    var now: UInt64 { millis.withLock { $0 } }
    func set(_ value: UInt64) { millis.withLock { $0 = value } }
    var function: @Sendable () -> UInt64 { { self.now } }
}

/// Three nodes in one process: real threads, real SQLite stores and snapshot files, an in-process transport.
private final class Cluster: @unchecked Sendable {
    let dir: String
    let transport = LocalTransport()
    let clock = ManualClock()
    let logger = Logger(label: "node-test")
    let ids: [NodeID] = [1, 2, 3]
    var services: [NodeID: ControlService] = [:]
    let snapshotEntries: UInt64

    init(snapshotEntries: UInt64 = 100_000) throws {
        self.dir = try temporaryFolder("control-service")
        self.snapshotEntries = snapshotEntries
        for id in ids { try start(id) }
    }

    func start(_ id: NodeID) throws {
        var options = RaftDriver.Options()
        // Elections after 0.5 to 1 s of silence, as a daemon's: a loaded CI machine's stalls of 100 ms or more (fsync,
        // two cores shared by parallel tests) would otherwise depose leaders mid-test.
        options.tickInterval = .milliseconds(50)
        options.snapshotEntries = snapshotEntries
        let state = ReplicatedControlState()
        let driver = try RaftDriver(
            config: RaftConfig(id: id, voters: ids),
            store: try SQLiteLogStore(path: "\(dir)/\(id).sqlite", logger: logger), stateMachine: state,
            transport: transport.endpoint(for: id),
            snapshots: try SnapshotFiles(directory: "\(dir)/\(id)-snapshots", logger: logger), options: options,
            logger: logger)
        transport.register(driver)
        services[id] = ControlService(driver: driver, state: state, logger: logger, now: clock.function)
        driver.start()
    }

    func stop(_ id: NodeID) {
        services[id]?.driver.stop()
        transport.unregister(id)
        services[id] = nil
    }

    func stopAll() { for id in Array(services.keys) { stop(id) } }

    func leader() async throws -> ControlService {
        try await waitForSome("a leader") { services.values.first { $0.driver.status.role == .leader } }
    }

    func followers(of leader: ControlService) -> [ControlService] {
        services.values.filter { $0 !== leader }.sorted { $0.driver.id < $1.driver.id }
    }

    /// Hands leadership from `leader` to `target` and waits until `target` leads. A transfer the target does not
    /// complete within an election timeout is abandoned (on a loaded machine it can be): asked again, of whoever
    /// leads then, once a second until the target leads.
    func transferLeadership(from leader: ControlService, to target: NodeID) async throws {
        var asked = ContinuousClock.now
        _ = try await leader.driver.transferLeadership(to: target)
        try await eventually("the transfer", timeout: .seconds(30)) {
            if services[target]!.driver.status.role == .leader { return true }
            if ContinuousClock.now - asked > .seconds(1), let current = services.values.first(where: { $0.driver.status.role == .leader }) {
                asked = ContinuousClock.now
                _ = try? await current.driver.transferLeadership(to: target)
            }
            return false
        }
    }
}

private func record(_ s: String) -> Element { .record(Array(s.utf8)) }

@Suite("The control state replicated through Raft", .serialized)
struct ControlServiceTests {
    @Test("commands commit through the leader; a follower refuses them, or hands a client's to the leader and answers once applied; followers serve linearizable reads after the leader's read index; reads are linearizable unless asked stale")
    func commandsAndReads() async throws {
        let cluster = try Cluster()
        defer { cluster.stopAll() }
        let leader = try await cluster.leader()
        let follower = cluster.followers(of: leader)[0]

        let first = try await leader.execute(.put(path: "/records/a", value: Array("1".utf8), session: 0))
        guard case .ok(let revision, "/records/a", 1, 0) = first else { Issue.record("put answered \(first)"); return }
        #expect(revision == 1)
        let failed = try await leader.execute(.create(path: "/records/a", element: record("2"), session: 0, sequential: false))
        #expect(failed == .failed(.exists(path: "/records/a", kind: "record")))
        let bad = try await leader.execute(.put(path: "/records/bad name", value: [], session: 0))
        guard case .failed(.invalidName) = bad else { Issue.record("a bad name gave \(bad)"); return }

        // The leader's linearizable read sees every acknowledged write.
        let value = try await leader.read { $0.anchors["/records/a"]?.element }
        #expect(value == record("1"))

        // A follower hands a command to the leader and answers once it has applied it; it serves linearizable
        // reads itself (after the leader's read index: it sees every acknowledged write), and stale reads.
        await #expect(throws: ControlServiceError.notLeader(leader: leader.driver.id)) {
            try await follower.execute(.put(path: "/records/b", value: [], session: 0))
        }
        let viaFollower = try await follower.execute(.put(path: "/records/b", value: [], session: 0), forward: true)
        #expect(viaFollower == .ok(revision: 2, path: "/records/b", version: 1, session: 0))
        #expect(try await follower.read { $0.anchors["/records/a"]?.element } == record("1"))
        #expect(try await leader.read { $0.anchors["/records/b"]?.version } == 1, "the leader has it too")
        let stale = try await follower.read(.stale) { $0.revision }
        #expect(stale == 2)

        // Bytes that are no command change nothing on any replica, and the answer says why.
        let answer = try CommandResult(decoding: try await leader.driver.propose([1, 99, 0]))
        guard case .failed(.malformedCommand) = answer else { Issue.record("garbage gave \(answer)"); return }
        let after = try await leader.read { $0.revision }
        #expect(after == 2, "no revision spent on a failed or malformed command")
    }

    @Test("a watch on a follower delivers every change in order from a revision, across a change of leader")
    func watchAcrossLeaderChange() async throws {
        let cluster = try Cluster()
        defer { cluster.stopAll() }
        let leader = try await cluster.leader()
        _ = try await leader.execute(.put(path: "/records/other", value: [], session: 0))
        let watcherNode = cluster.followers(of: leader)[1]
        let stream = try watcherNode.watch(prefix: "/records/w", after: 0)
        let collected = Task { () -> [WatchEvent] in
            var events: [WatchEvent] = []
            for try await event in stream {
                events.append(event)
                if events.count == 40 { break }
            }
            return events
        }
        for i in 0..<20 { _ = try await leader.execute(.put(path: "/records/w/k\(i)", value: [UInt8(i)], session: 0)) }
        let target = cluster.followers(of: leader)[0].driver.id
        try await cluster.transferLeadership(from: leader, to: target)
        let next = cluster.services[target]!
        for i in 20..<40 { _ = try await next.execute(.put(path: "/records/w/k\(i)", value: [UInt8(i)], session: 0)) }
        let events = try await collected.value
        #expect(events.map(\.path) == (0..<40).map { "/records/w/k\($0)" })
        #expect(events.map(\.revision) == Array(2...41), "one revision per put, none missed, none repeated")
        #expect(events.allSatisfy { $0.kind == .put })
    }

    @Test("a new leader gives every session a full TTL, then expires it with its ephemeral records")
    func leasesAcrossLeaderChange() async throws {
        let cluster = try Cluster()
        defer { cluster.stopAll() }
        let clock = cluster.clock
        let leader = try await cluster.leader()
        guard case .ok(_, _, _, let session) = try await leader.execute(.grantSession(owner: "client-1", ttlMillis: 1000)) else {
            Issue.record("no session"); return
        }
        _ = try await leader.execute(.put(path: "/records/svc/a", value: Array("10.0.0.1".utf8), session: session))
        _ = try await leader.execute(.put(path: "/records/svc/durable", value: [], session: 0))

        clock.set(0)
        #expect(await leader.expireLeases() == 0)
        clock.set(800)
        #expect(try leader.keepAlive(session), "a keep-alive costs no log entry and moves the deadline to 1800")
        #expect(try leader.keepAlive(999) == false, "an unknown session")
        clock.set(1500)
        #expect(await leader.expireLeases() == 0)
        #expect(throws: ControlServiceError.self) { try cluster.followers(of: leader)[0].keepAlive(session) }

        // Hand over: keep-alives sent to the old leader are unknown to the new one, so it starts every lease afresh.
        let target = cluster.followers(of: leader)[0].driver.id
        try await cluster.transferLeadership(from: leader, to: target)
        let next = cluster.services[target]!
        try await waitFor("the new leader to apply the session") { next.state.read { $0.sessions[session] != nil } }
        clock.set(1900)
        #expect(await next.expireLeases() == 0, "past the old deadline, but the new leader took over at 1900")
        clock.set(2850)
        #expect(await next.expireLeases() == 0)
        #expect(try await next.read { $0.anchors["/records/svc/a"]?.element } == record("10.0.0.1"))
        clock.set(2950)
        #expect(await next.expireLeases() == 1)
        #expect(try await next.read { $0.anchors["/records/svc/a"] } == nil, "the ephemeral went with its session")
        #expect(try await next.read { $0.sessions[session] } == nil)
        #expect(try await next.read { $0.anchors["/records/svc/durable"]?.element } == .record([]))
        #expect(try next.keepAlive(session) == false)
    }

    @Test("a node restarted from its SQLite log and snapshot holds byte-identical state")
    func restartFromDisk() async throws {
        let cluster = try Cluster(snapshotEntries: 25)
        defer { cluster.stopAll() }
        var leader = try await cluster.leader()
        for i in 0..<60 { _ = try await leader.execute(.put(path: "/records/r/k\(i % 17)", value: [UInt8(i)], session: 0)) }
        let follower = cluster.followers(of: leader)[0]
        let restarted = follower.driver.id
        // Snapshots are written in the background: stop the follower only once it has one on disk.
        try await waitFor("the follower's first snapshot") { follower.driver.status.snapshotIndex > 0 }
        cluster.stop(restarted)
        leader = try await cluster.leader()
        for i in 60..<120 { _ = try await leader.execute(.put(path: "/records/r/k\(i % 17)", value: [UInt8(i)], session: 0)) }
        try cluster.start(restarted)
        let node = cluster.services[restarted]!
        let commit = leader.driver.status.commitIndex
        try await waitFor("the restarted node to catch up") { node.driver.status.appliedIndex >= commit }
        try await waitFor("the leader to apply the same") { leader.driver.status.appliedIndex >= commit }
        #expect(node.driver.status.snapshotIndex > 0, "it started from a snapshot")
        let ours = node.state.read { $0.snapshot() }
        let theirs = leader.state.read { $0.snapshot() }
        #expect(ours == theirs)
        #expect(node.state.read { $0.revision } == 120)
    }
}

@Suite("Watches on the replicated state")
struct WatchTests {
    private func apply(_ state: ReplicatedControlState, _ command: Command, at index: UInt64) -> CommandResult {
        try! CommandResult(decoding: state.apply(Entry(term: 1, index: index, data: command.encoded)))
    }

    @Test("a watch from a compacted revision and a watcher that falls behind both get compacted with where to resume")
    func compactedAndSlow() async throws {
        let state = ReplicatedControlState(historyLimit: 4, watchBuffer: 3)
        for i in 1...10 { _ = apply(state, .put(path: "/records/k\(i)", value: [], session: 0), at: UInt64(i)) }
        #expect(throws: WatchError.self) { try state.watch(prefix: "/", after: 0) }
        let stream = try state.watch(prefix: "/records", after: 10)
        for i in 11...15 { _ = apply(state, .put(path: "/records/k\(i)", value: [], session: 0), at: UInt64(i)) }
        var seen: [Revision] = []
        do {
            for try await event in stream { seen.append(event.revision) }
            Issue.record("the stream ended without an error")
        } catch let error as WatchError {
            #expect(error == .compacted(resumeFrom: 14), "events 11 to 13 fit the buffer, 14 did not")
        }
        #expect(seen == [11, 12, 13])
        #expect(state.watcherCount == 0)
    }

    @Test("a watch from a revision this replica has not reached (behind, or replaying its log after a restart) starts there, not before; endWatches ends every watch, and any opened after")
    func watchFromTheFuture() async throws {
        let state = ReplicatedControlState()
        let stream = try state.watch(prefix: "/", after: 3)
        for i in 1...5 { _ = apply(state, .put(path: "/records/k\(i)", value: [], session: 0), at: UInt64(i)) }
        state.endWatches()
        var seen: [Revision] = []
        for try await event in stream { seen.append(event.revision) }
        #expect(seen == [4, 5])
        var later = try state.watch(prefix: "/", after: 5).makeAsyncIterator()
        #expect(try await later.next() == nil)
        #expect(state.watcherCount == 0)

        // The same when the replica catches up through a snapshot older than the watch's revision (a wiped voter
        // added again): the restore does not move the watch back.
        let source = ReplicatedControlState()
        for i in 1...3 { _ = apply(source, .put(path: "/records/k\(i)", value: [], session: 0), at: UInt64(i)) }
        let replica = ReplicatedControlState()
        let watching = try replica.watch(prefix: "/", after: 5)
        try replica.restore(try source.snapshot()())
        for i in 4...7 { _ = apply(replica, .put(path: "/records/k\(i)", value: [], session: 0), at: UInt64(i)) }
        replica.endWatches()
        var got: [Revision] = []
        for try await event in watching { got.append(event.revision) }
        #expect(got == [6, 7])
    }

    @Test("a read barrier's failure answers as the API's error (503 no_leader), not a bare 500")
    func barrierFailureIsAnAPIError() {
        #expect(ControlServiceError.notLeader(leader: nil).status.code == 503)
    }

    @Test("a watch filters by prefix and ends when dropped")
    func prefixes() async throws {
        let state = ReplicatedControlState()
        let stream = try state.watch(prefix: "/records/a", after: 0)
        _ = apply(state, .put(path: "/records/ab", value: [], session: 0), at: 1)
        _ = apply(state, .put(path: "/records/a/x", value: [], session: 0), at: 2)
        _ = apply(state, .delete(path: "/records/a/x", version: nil), at: 3)
        var iterator = stream.makeAsyncIterator()
        let first = try await iterator.next()
        let second = try await iterator.next()
        #expect(first?.path == "/records/a/x" && first?.kind == .put && first?.revision == 2)
        #expect(second?.path == "/records/a/x" && second?.kind == .delete && second?.revision == 3)
        #expect(state.watcherCount == 1)
    }

    @Test("several watchers each get their own prefix's events; one that falls behind ends, the others go on")
    func severalWatchers() async throws {
        let state = ReplicatedControlState(watchBuffer: 4)
        let everything = try state.watch(prefix: "/", after: 0)
        let slashed = try state.watch(prefix: "/records/a/", after: 0)
        let exact = try state.watch(prefix: "/records/ab", after: 0)
        var index: UInt64 = 0
        func put(_ path: String) {
            index += 1
            _ = apply(state, .put(path: path, value: [], session: 0), at: index)
        }
        put("/records/ab")  // 1: everything, exact
        put("/records/a/x")  // 2: everything, slashed
        put("/records/abc")  // 3: everything
        put("/records/ab/y")  // 4: everything, exact
        put("/records/a/z")  // 5: everything overflows (buffer 4) and ends; slashed
        #expect(state.watcherCount == 2)
        put("/records/a/w")  // 6: slashed
        // Every stream ends (endWatches), so each is read to its end and a missing or an extra event shows.
        state.endWatches()
        func revisions(_ stream: ReplicatedControlState.WatchStream) async throws -> [Revision] {
            var out: [Revision] = []
            for try await event in stream { out.append(event.revision) }
            return out
        }
        #expect(try await revisions(slashed) == [2, 5, 6])
        #expect(try await revisions(exact) == [1, 4])
        var all: [Revision] = []
        do {
            for try await event in everything { all.append(event.revision) }
            Issue.record("the stream that fell behind ended without an error")
        } catch let error as WatchError {
            #expect(error == .compacted(resumeFrom: 5))
        }
        #expect(all == [1, 2, 3, 4])
    }
}
