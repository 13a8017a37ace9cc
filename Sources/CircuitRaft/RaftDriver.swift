import Foundation
import Logging
import Synchronization

/// Carries messages to peers. `send` must not block; a message may be lost (Raft retries).
public protocol RaftTransport: Sendable {
    func send(_ messages: [Message])
    /// One piece of an InstallSnapshot stream (or its acknowledgement), between two drivers.
    func send(_ chunk: SnapshotChunk)
}

/// A piece of a snapshot file streamed from a leader to a follower, or the follower's answer.
///
/// The leader sends `data` chunks in order, at most `Options.snapshotWindow` unacknowledged; the follower answers
/// each with an `ack` carrying how many bytes it holds, and the last one only once the file is durable and handed to
/// its Raft node. `abort` from either side ends the stream.
public struct SnapshotChunk: Sendable, Hashable {
    public enum Kind: UInt8, Sendable { case data = 1, ack = 2, abort = 3 }
    public var kind: Kind
    public var from: NodeID
    public var to: NodeID
    /// The leader's term when it decided to send the snapshot.
    public var term: UInt64
    public var snapshot: SnapshotMetadata
    /// data: where `data` starts in the file; ack: how many bytes the follower holds.
    public var offset: UInt64
    public var data: [UInt8]
    /// data: this chunk ends the file.
    public var last: Bool

    public init(
        kind: Kind, from: NodeID, to: NodeID, term: UInt64, snapshot: SnapshotMetadata, offset: UInt64,
        data: [UInt8] = [], last: Bool = false
    ) {
        self.kind = kind
        self.from = from
        self.to = to
        self.term = term
        self.snapshot = snapshot
        self.offset = offset
        self.data = data
        self.last = last
    }
}

/// The replicated state machine. Called only from the driver's thread, in log order.
public protocol RaftStateMachine: AnyObject {
    /// Applies one committed entry and returns the answer for whoever proposed it.
    func apply(_ entry: Entry) -> [UInt8]
    /// The same, told whether anyone on this replica waits for the answer: when no one does (most entries on most
    /// replicas), a state machine may skip putting it together and return anything. By default, `apply(entry)`.
    func apply(_ entry: Entry, answered: Bool) -> [UInt8]
    /// Captures the state as of the last applied entry. Called on the driver's thread, so it must be quick (copy a
    /// value); the closure it returns does the serializing on another thread, so applying never waits for it.
    func snapshot() -> @Sendable () throws -> [UInt8]
    /// Replaces the state with a snapshot's payload.
    func restore(_ payload: [UInt8]) throws
}

extension RaftStateMachine {
    public func apply(_ entry: Entry, answered: Bool) -> [UInt8] { apply(entry) }
}

/// Why a proposal or read through the driver failed.
public enum RaftDriverError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The protocol refused it (not the leader, entry too large).
    case refused(RaftRefusal)
    /// This node lost leadership before the proposal committed: it may or may not commit later.
    case outcomeUnknown
    /// The driver stopped (or failed) before an answer.
    case stopped
    /// A read's index was confirmed, but this node did not apply that far within `Options.readApplyLimit`: it is
    /// cut off from the leader or far behind. Another node may answer.
    case behind(index: UInt64, applied: UInt64)
    /// The log store failed: the node stopped.
    case storageFailed(String)

    public var description: String {
        switch self {
        case .refused(let r): return r.description
        case .outcomeUnknown: return "leadership changed before the proposal committed; it may or may not be applied"
        case .stopped: return "the Raft node has stopped"
        case .behind(let index, let applied):
            return "this node has applied up to \(applied) and did not reach the read's index \(index) in time: it is cut off or behind"
        case .storageFailed(let why): return "the log store failed and the node stopped: \(why)"
        }
    }
}

/// A snapshot of a driver's state, published after each turn of its loop.
public struct RaftStatus: Sendable, Hashable {
    public var id: NodeID
    public var role: Role
    public var term: UInt64
    public var leader: NodeID
    public var commitIndex: UInt64
    public var appliedIndex: UInt64
    public var lastIndex: UInt64
    public var syncCount: Int
    public var running: Bool
    public var failure: String?
    public var membership: Membership
    /// Index of the snapshot the log starts after (0: none).
    public var snapshotIndex: UInt64
    /// Snapshots received from a leader and installed since this driver started.
    public var snapshotsInstalled: Int = 0
    /// A snapshot of this node's state machine is being written.
    public var snapshotting: Bool = false
}

/// The I/O shell around `Raft`: one dedicated thread that runs the Ready loop.
///
/// Each turn takes everything that arrived (messages, proposals, reads, a due tick), steps it into the protocol, then
/// persists the whole batch in one transaction (one fsync for every proposal that arrived meanwhile: group commit),
/// sends, applies and advances. The thread is not one of Swift's cooperative threads, so fsync never stalls them.
/// With `RaftConfig.asyncStorageWrites` the loop hands each batch to a writer thread instead and goes on stepping;
/// the writer makes all that queued up durable in one transaction, sends what waited for it, and reports back.
public final class RaftDriver: @unchecked Sendable {
    public struct Options: Sendable {
        /// Length of one protocol tick. Default 50 ms (with the protocol's defaults: heartbeats every 50 ms and
        /// elections after 500 to 1000 ms of silence).
        public var tickInterval: Duration = .milliseconds(50)
        /// Take a snapshot and compact the log once this many entries were applied since the last one and their
        /// bytes reach a quarter of that snapshot's size, or once `snapshotBytes` bytes of entries were, whichever
        /// comes first. Defaults 100,000 entries (as etcd 3.5) and 64 MiB. The log, which is also held in memory,
        /// stays bounded by both; the quarter keeps a large state from being written out again for every few
        /// thousand entries (at most four bytes of snapshot for a byte of log). Needs `SnapshotFiles`; without them
        /// the log is never compacted.
        ///
        /// (10,000 entries, as etcd 3.6, kept `bench api`'s daemons 5 MB smaller between snapshots, but a snapshot
        /// written at low priority under load holds its serialized state, twice, until it is done: right after 64
        /// clients' writes, members measured up to 140 MB instead of 68.)
        public var snapshotEntries: UInt64 = 100_000
        public var snapshotBytes: Int = 64 << 20
        /// The pace of writing a snapshot of this node's own state, in bytes per second (nil: as fast as the disk
        /// goes). Default 64 MiB/s: a large snapshot leaves disk bandwidth to the log's fsyncs.
        public var snapshotWriteBytesPerSecond: Int? = 64 << 20
        /// Bytes per InstallSnapshot chunk. Default 1 MiB.
        public var snapshotChunkBytes: Int = 1 << 20
        /// Chunks in flight per InstallSnapshot stream before the follower must acknowledge. Default 4.
        public var snapshotWindow: Int = 4
        /// A stream with no acknowledgement for this long fails (the leader retries later). Default 10 s.
        public var snapshotTimeout: Duration = .seconds(10)
        /// A stream with no acknowledgement for this long resends from what the follower acknowledged. Default 500 ms.
        public var snapshotRetransmit: Duration = .milliseconds(500)
        /// A linearizable read whose index the leader confirmed waits at most this long for this node to apply up to
        /// it, then fails with `behind` (a follower cut off right after the confirmation would otherwise hold it
        /// until its caller gave up). Default 5 s.
        public var readApplyLimit: Duration = .seconds(5)
        /// Where the loop's turns run: nil, a thread of the driver's own; or a serial executor such as the NIO event
        /// loop that carries the peers' connections, so that messages are stepped and sent on the thread that reads
        /// and writes them, with no hand-off between threads (each costs a wake-up on the latency path).
        public var executor: (any RaftLoopExecutor)? = nil
        public init() {}
    }

    public let id: NodeID
    private let options: Options
    private let logger: Logger
    private let transport: any RaftTransport
    // Touched only by the loop thread (or before it starts / after it ends).
    private var raft: Raft
    private let store: any RaftLogStore
    private let stateMachine: any RaftStateMachine
    /// Proposals waiting for their entry to be applied, by index: this leader's own, and those this follower
    /// forwarded (`forwarded`), which the leader placed.
    private var pendingProposals: [UInt64: PendingProposal] = [:]
    /// Proposals forwarded to the leader and not yet placed, by request.
    private var forwardedProposals: [UInt64: CheckedContinuation<[UInt8], any Error>] = [:]
    private var pendingReads: [UInt64: CheckedContinuation<UInt64, any Error>] = [:]
    private var confirmedReads: [(index: UInt64, id: UInt64, deadline: ContinuousClock.Instant, continuation: CheckedContinuation<UInt64, any Error>)] = []
    private let snapshots: SnapshotFiles?
    private var snapshotInProgress = false
    private var snapshotsInstalled = 0
    /// Bytes of entries applied since the last snapshot was taken or installed.
    private var bytesSinceSnapshot = 0
    /// The size of the last snapshot taken, installed or recovered.
    private var lastSnapshotBytes = 0
    /// A store write outside `drainReady` failed: the loop stops on its next turn.
    private var raftStoreFailure: String?
    /// With `RaftConfig.asyncStorageWrites`: the serial queue that makes each batch durable and then sends what
    /// waited for it, while the loop goes on stepping. Every other use of the store goes through it too (`withStore`).
    private let writer: DispatchQueue?
    /// The loop's: batches handed to `writer` and not yet reported back.
    private var writesInFlight = 0
    /// The loop's: the store's fsyncs as last reported (the writer's count, with asynchronous writes).
    private var syncCount: Int
    /// A write on `writer` failed: nothing more is written, and the loop stops on its next turn.
    private let writerFailure = Mutex<String?>(nil)
    /// Batches handed to the writer and not yet taken by it, in order: it takes all there are at once and makes them
    /// durable in one transaction (one fsync for all that queued up during the last).
    private let writesQueued = Mutex<[QueuedWrite]>([])

    private struct QueuedWrite: Sendable {
        var hardState: HardState?
        var entries: [Entry]
        var epoch: UInt64
        var messages: [Message]
    }
    private var outgoing: [NodeID: OutgoingSnapshot] = [:]
    private var incoming: [NodeID: SnapshotReceiver] = [:]

    private struct OutgoingSnapshot {
        var meta: SnapshotMetadata
        var term: UInt64
        var size: UInt64
        var sent: UInt64 = 0
        var acknowledged: UInt64 = 0
        var lastProgress: ContinuousClock.Instant
    }

    // Shared between callers and the loop thread, under `condition`.
    private let condition = NSCondition()
    private var inbox = Inbox()
    /// Under `condition`: the loop has ended and answers nothing more.
    private var finished = false
    /// Under `condition`, with an executor: a turn is queued on it.
    private var turnQueued = false
    /// Under `condition`: `start()` has run. With an executor, no turn is queued before (what arrives waits in the
    /// inbox, as it does for the thread): a turn must not race `start()`.
    private var loopStarted = false
    private let done = NSCondition()
    /// Under `done`: the loop thread was started, and has ended.
    private var started = false
    private var loopEnded = false
    /// The loop's: when the protocol ticks next.
    private var nextTick = Date()
    /// With an executor: the timer that wakes the loop for its ticks.
    private let tickTimer = Mutex<(any RaftLoopTimer)?>(nil)

    private let published: Mutex<RaftStatus>

    /// A caller waiting for a proposal's or a read's answer: `id` names it to Raft and to a cancellation.
    private struct Call<T> {
        var id: UInt64
        var data: [UInt8] = []
        var continuation: CheckedContinuation<T, any Error>
    }

    /// Names the calls (`Call.id`): unique for the life of the driver.
    private let callIDs = Atomic<UInt64>(1)

    /// Runs `body` with a new call id; if the calling task is cancelled meanwhile, the loop answers the call with
    /// `CancellationError` (a continuation alone would wait on, and a stopping daemon would wait for it).
    private func cancellableCall<T>(_ body: (UInt64, CheckedContinuation<T, any Error>) -> Void) async throws -> T {
        let id = callIDs.add(1, ordering: .relaxed).oldValue
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { continuation in
                body(id, continuation)
                // Cancelled before the call was queued: `onCancel` has run already, and found nothing to answer.
                if Task.isCancelled { _ = enqueue { $0.cancelled.append(id) } }
            }
        } onCancel: {
            _ = enqueue { $0.cancelled.append(id) }
        }
    }

    private struct Inbox {
        var messages: [Message] = []
        var chunks: [SnapshotChunk] = []
        var proposals: [Call<[UInt8]>] = []
        /// Proposals a follower may hand to its leader (`propose(_:forward:)`).
        var forwardable: [Call<[UInt8]>] = []
        var reads: [Call<UInt64>] = []
        /// Calls whose caller was cancelled (a request given up, a daemon stopping): answered `CancellationError`.
        var cancelled: [UInt64] = []
        var confChanges: [(ConfChange, CheckedContinuation<[UInt8], any Error>)] = []
        var transfers: [(NodeID?, CheckedContinuation<NodeID, any Error>)] = []
        var snapshotsWritten: [(meta: SnapshotMetadata, error: String?, bytes: Int)] = []
        /// Batches the writer made durable (or failed to), in order.
        var persisted: [PersistedWrite] = []
        var campaign = false
        var unreachable: [NodeID] = []
        var stopping = false
        var isEmpty: Bool {
            messages.isEmpty && chunks.isEmpty && proposals.isEmpty && forwardable.isEmpty && reads.isEmpty && confChanges.isEmpty
                && cancelled.isEmpty
                && transfers.isEmpty && snapshotsWritten.isEmpty && persisted.isEmpty && !campaign && unreachable.isEmpty
                && !stopping
        }
    }

    /// The writer's report of one batch: its last entry (none for a batch of only a hard state or messages) and the
    /// store's fsyncs since it opened.
    private struct PersistedWrite {
        var last: (index: UInt64, term: UInt64, epoch: UInt64)?
        var syncCount: Int
    }

    /// A driver for the node described by `config`, resuming from what `store` holds.
    /// `snapshots` holds the snapshot files; without it the log is never compacted and no snapshot can be sent or
    /// installed.
    public init(
        config: RaftConfig, store: any RaftLogStore, stateMachine: any RaftStateMachine, transport: any RaftTransport,
        snapshots: SnapshotFiles? = nil, options: Options = Options(), logger: Logger
    ) throws {
        let recovered = try store.recover()
        var snapshotBytes = 0
        if let meta = recovered.snapshot {
            guard let snapshots else {
                throw SnapshotFileError.corrupt(path: "(none)", detail: "the store names snapshot \(meta) but no snapshot folder was given")
            }
            let payload = try snapshots.load(meta)
            snapshotBytes = payload.count
            try stateMachine.restore(payload)
            snapshots.removeAll(except: meta)
        }
        self.lastSnapshotBytes = snapshotBytes
        self.writer = config.asyncStorageWrites ? DispatchQueue(label: "raft-\(config.id)-writer") : nil
        self.syncCount = store.syncCount
        self.raft = try Raft(
            config: config, hardState: recovered.hardState, entries: recovered.entries, snapshot: recovered.snapshot)
        self.snapshots = snapshots
        self.id = config.id
        self.store = store
        self.stateMachine = stateMachine
        self.transport = transport
        self.options = options
        var logger = logger
        logger[metadataKey: "raft"] = "\(config.id)"
        self.logger = logger
        self.published = Mutex(
            RaftStatus(
                id: config.id, role: .follower, term: recovered.hardState.term, leader: .none,
                commitIndex: recovered.hardState.commit, appliedIndex: 0,
                lastIndex: recovered.entries.last?.index ?? 0, syncCount: store.syncCount, running: false,
                membership: Membership(voters: config.voters), snapshotIndex: recovered.snapshot?.index ?? 0))
    }

    public var status: RaftStatus { published.withLock { $0 } }

    /// Starts the loop: a thread of its own, or turns on `Options.executor`.
    public func start() {
        published.withLock { $0.running = true }
        nextTick = Date().addingTimeInterval(tickSeconds)
        if let executor = options.executor {
            done.lock()
            started = true
            done.unlock()
            condition.lock()
            loopStarted = true
            condition.unlock()
            tickTimer.withLock { $0 = executor.every(options.tickInterval) { [weak self] in self?.wake() } }
            wake()
            return
        }
        let thread = Thread { [self] in
            self.loop()
        }
        thread.name = "raft-\(id)"
        thread.stackSize = 8 << 20
        done.lock()
        started = true
        done.unlock()
        thread.start()
    }

    /// Stops the loop after its current turn, closes the store and waits for both. Everything unanswered fails with
    /// `.stopped`. What was persisted stays; what was not is lost, as in a crash.
    public func stop() {
        condition.lock()
        inbox.stopping = true
        condition.signal()
        condition.unlock()
        done.lock()
        let running = started
        done.unlock()
        if running, let executor = options.executor {
            // On the executor itself, waiting for a turn queued behind this one would never end: the turn runs here.
            if executor.isCurrent { runTurn() } else { wake() }
        }
        done.lock()
        while started && !loopEnded { done.wait() }
        done.unlock()
    }

    /// Graceful shutdown: a leader first hands over to the most up-to-date voter and waits (up to `timeout`) for
    /// another node to take over, so the cluster does not wait an election timeout; then the driver stops.
    public func shutdown(timeout: Duration = .seconds(2)) async {
        if status.role == .leader, status.membership.voters.count > 1, (try? await transferLeadership()) != nil {
            let deadline = ContinuousClock.now + timeout
            while status.role == .leader && ContinuousClock.now < deadline {
                try? await Task.sleep(for: .milliseconds(2))
            }
        }
        stop()
    }

    /// Messages from peers.
    public func receive(_ messages: [Message]) {
        guard !messages.isEmpty else { return }
        enqueue { $0.messages.append(contentsOf: messages) }
    }

    /// A piece of an InstallSnapshot stream from a peer.
    public func receive(_ chunk: SnapshotChunk) {
        enqueue { $0.chunks.append(chunk) }
    }

    /// Proposes a membership change; returns once it is committed and applied here.
    public func changeMembership(_ change: ConfChange) async throws {
        _ = try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<[UInt8], any Error>) in
            if !enqueue({ $0.confChanges.append((change, continuation)) }) {
                continuation.resume(throwing: RaftDriverError.stopped)
            }
        }
    }

    /// Asks this leader to hand over to `target` (or to the most up-to-date voter); returns the target once the
    /// request is under way. Watch `status.role` for the outcome.
    public func transferLeadership(to target: NodeID? = nil) async throws -> NodeID {
        try await withCheckedThrowingContinuation { continuation in
            if !enqueue({ $0.transfers.append((target, continuation)) }) {
                continuation.resume(throwing: RaftDriverError.stopped)
            }
        }
    }

    /// Adds to the inbox and wakes the loop; false if the driver is stopping.
    @discardableResult
    private func enqueue(_ add: (inout Inbox) -> Void) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        if inbox.stopping || finished { return false }
        add(&inbox)
        guard let executor = options.executor else {
            condition.signal()
            return true
        }
        if !turnQueued && loopStarted {
            turnQueued = true
            executor.execute { [self] in runTurn() }
        }
        return true
    }

    /// With an executor: queues a turn unless one is queued (for a tick, or to stop).
    private func wake() {
        guard let executor = options.executor else { return }
        condition.lock()
        let queue = !turnQueued && !finished && loopStarted
        if queue { turnQueued = true }
        condition.unlock()
        if queue { executor.execute { [self] in runTurn() } }
    }

    /// Starts an election at once.
    public func campaign() {
        enqueue { $0.campaign = true }
    }

    /// The transport lost its connection to `peer` (see `Raft.peerUnreachable`).
    public func peerUnreachable(_ peer: NodeID) {
        enqueue { $0.unreachable.append(peer) }
    }

    private struct PendingProposal {
        var id: UInt64
        var term: UInt64
        var continuation: CheckedContinuation<[UInt8], any Error>
        var forwarded: Bool
    }

    /// Proposes `data`; returns the state machine's answer once it is committed and applied here. Only the leader
    /// proposes, unless `forward`: then a follower that knows its leader hands it over (`Raft.forwardProposal`)
    /// and answers when it applies the entry itself; if the leader certainly did not append it the error is
    /// `refused(.notLeader)`, and if that is not known, `outcomeUnknown`. (What only a leader may decide, such as
    /// a lease's expiry, is proposed without `forward`, so that a deposed leader cannot have it committed.)
    public func propose(_ data: [UInt8], forward: Bool = false) async throws -> [UInt8] {
        try await cancellableCall { id, continuation in
            let call = Call(id: id, data: data, continuation: continuation)
            if !enqueue({ forward ? $0.forwardable.append(call) : $0.proposals.append(call) }) {
                continuation.resume(throwing: RaftDriverError.stopped)
            }
        }
    }

    /// A linearizable read barrier (ReadIndex): returns once this node's state machine has applied everything
    /// committed before the call, with leadership confirmed by a quorum. The leader answers, and so does a follower
    /// that knows its leader (it asks the leader for the index, then waits until it has applied that far).
    public func readBarrier() async throws -> UInt64 {
        try await cancellableCall { id, continuation in
            if !enqueue({ $0.reads.append(Call(id: id, continuation: continuation)) }) {
                continuation.resume(throwing: RaftDriverError.stopped)
            }
        }
    }

    // MARK: - The loop

    private var tickSeconds: Double {
        options.tickInterval / .seconds(1)
    }

    /// The loop on a thread of its own: waits for something in the inbox or the next tick, then takes a turn.
    private func loop() {
        while true {
            condition.lock()
            while inbox.isEmpty && Date() < nextTick {
                _ = condition.wait(until: nextTick)
            }
            let batch = inbox
            inbox = Inbox()
            if batch.stopping {
                inbox = batch  // left for finish(), which answers everything in it
                condition.unlock()
                break
            }
            condition.unlock()
            if let failure = turn(batch) {
                finish(failure: failure)
                return
            }
        }
        finish(failure: nil)
    }

    /// One turn on the executor: takes the inbox (a tick may be all that is due), or ends the loop.
    private func runTurn() {
        condition.lock()
        turnQueued = false
        if finished {
            condition.unlock()
            return
        }
        let batch = inbox
        inbox = Inbox()
        if batch.stopping {
            inbox = batch  // left for finish(), which answers everything in it
            condition.unlock()
            finish(failure: nil)
            return
        }
        condition.unlock()
        if let failure = turn(batch) { finish(failure: failure) }
    }

    /// Steps everything in `batch` (and a tick, if due) into the protocol, then persists, sends and applies what it
    /// made ready. Answers the failure that ends the loop, or nil.
    private func turn(_ batch: Inbox) -> String? {
        let now = Date()
        if now >= nextTick {
            raft.tick()
            nextTick = nextTick.addingTimeInterval(tickSeconds)
            if nextTick < now { nextTick = now.addingTimeInterval(tickSeconds) }
        }
        for write in batch.persisted {
            writesInFlight -= 1
            syncCount = write.syncCount
            if let last = write.last { raft.persisted(through: last.index, term: last.term, epoch: last.epoch) }
        }
        if batch.campaign { raft.campaign() }
        for peer in batch.unreachable { raft.peerUnreachable(peer) }
        for m in batch.messages { raft.step(m) }
        for chunk in batch.chunks { receiveChunk(chunk) }
        for written in batch.snapshotsWritten { snapshotWritten(written.meta, error: written.error, bytes: written.bytes) }
        for (change, continuation) in batch.confChanges {
            switch raft.proposeConfChange(change) {
            case .success(let ticket):
                pendingProposals[ticket.firstIndex] = PendingProposal(
                    id: 0, term: ticket.term, continuation: continuation, forwarded: false)
            case .failure(let refusal): continuation.resume(throwing: RaftDriverError.refused(refusal))
            }
        }
        for (target, continuation) in batch.transfers {
            guard let to = target ?? raft.bestTransferTarget else {
                continuation.resume(throwing: RaftDriverError.refused(.invalidTransfer("no other voter")))
                continue
            }
            if let refusal = raft.transferLeadership(to: to) {
                continuation.resume(throwing: RaftDriverError.refused(refusal))
            } else {
                continuation.resume(returning: to)
            }
        }
        if !batch.forwardable.isEmpty {
            if raft.role == .follower && raft.leader != .none {
                forward(batch.forwardable)
            } else {
                propose(batch.forwardable)
            }
        }
        if !batch.proposals.isEmpty { propose(batch.proposals) }
        for call in batch.reads {
            if let refusal = raft.readIndex(request: call.id) {
                call.continuation.resume(throwing: RaftDriverError.refused(refusal))
            } else {
                pendingReads[call.id] = call.continuation
            }
        }
        for id in batch.cancelled { cancel(id) }
        if let failed = raftStoreFailure ?? writerFailure.withLock({ $0 }) { return failed }
        do {
            try drainReady()
        } catch {
            logger.critical("Raft node stopping: the log store failed", metadata: ["error": "\(error)"])
            return "\(error)"
        }
        // A deposed leader's own proposals, and forwarded ones of a term this node has moved past, may or may not
        // be committed by the next leader.
        if !pendingProposals.isEmpty {
            let isLeader = raft.role == .leader, term = raft.term
            for (index, p) in pendingProposals where p.forwarded ? p.term < term : !isLeader {
                p.continuation.resume(throwing: RaftDriverError.outcomeUnknown)
                pendingProposals[index] = nil
            }
        }
        pumpSnapshotStreams()
        maybeTakeSnapshot()
        publish(running: true, failure: nil)
        return nil
    }

    private func forward(_ proposals: [Call<[UInt8]>]) {
        for call in proposals {
            if let refusal = raft.forwardProposal(call.data, request: call.id) {
                call.continuation.resume(throwing: RaftDriverError.refused(refusal))
            } else {
                forwardedProposals[call.id] = call.continuation
            }
        }
    }

    private func propose(_ proposals: [Call<[UInt8]>]) {
        switch raft.propose(proposals.map(\.data)) {
        case .success(let ticket):
            var index = ticket.firstIndex
            for call in proposals {
                pendingProposals[index] = PendingProposal(id: call.id, term: ticket.term, continuation: call.continuation, forwarded: false)
                index += 1
            }
        case .failure(let refusal):
            for call in proposals { call.continuation.resume(throwing: RaftDriverError.refused(refusal)) }
        }
    }

    /// The caller of call `id` gave up: its continuation is answered `CancellationError` now. Raft may still
    /// answer it later (a read state, a placement); then nothing is waiting.
    private func cancel(_ id: UInt64) {
        if let c = pendingReads.removeValue(forKey: id) { return c.resume(throwing: CancellationError()) }
        if let i = confirmedReads.firstIndex(where: { $0.id == id }) {
            return confirmedReads.remove(at: i).continuation.resume(throwing: CancellationError())
        }
        if let c = forwardedProposals.removeValue(forKey: id) { return c.resume(throwing: CancellationError()) }
        if let (index, p) = pendingProposals.first(where: { $0.value.id == id }) {
            pendingProposals[index] = nil
            p.continuation.resume(throwing: CancellationError())
        }
    }

    /// The confirmed reads this node has applied far enough for are answered; those waiting past their limit fail.
    private func answerConfirmedReads() {
        guard !confirmedReads.isEmpty else { return }
        let applied = raft.appliedIndex
        let now = ContinuousClock.now
        confirmedReads.removeAll { read in
            if read.index <= applied {
                read.continuation.resume(returning: applied)
            } else if now >= read.deadline {
                read.continuation.resume(throwing: RaftDriverError.behind(index: read.index, applied: applied))
            } else {
                return false
            }
            return true
        }
    }

    private func drainReady() throws {
        defer { answerConfirmedReads() }  // every turn: a read past its limit fails even when nothing else happens
        while raft.hasReady {
            let rd = raft.ready()
            transport.send(rd.messagesBeforePersist)
            var messages = rd.messages
            messages.removeAll { m in
                guard m.kind == .snapshot, let meta = m.snapshot else { return false }
                startSnapshotStream(to: m.to, meta: meta, term: m.term)
                return true
            }
            if rd.persistInline {
                waitForWrites()
                // A failed write leaves a hole that nothing written after it may cover (or be acknowledged over).
                if let failed = writerFailure.withLock({ $0 }) { throw RaftDriverError.storageFailed(failed) }
                if let meta = rd.snapshot { try installSnapshot(meta, hardState: rd.hardState) }
                try store.persist(hardState: rd.hardState, entries: rd.entries)
                syncCount = store.syncCount  // (the writer is idle: waitForWrites)
                transport.send(messages)
            } else if rd.entries.isEmpty && rd.hardState == nil && writesInFlight == 0 {
                transport.send(messages)  // nothing on its way to the disk that they could claim
            } else {
                persistInBackground(hardState: rd.hardState, entries: rd.entries, epoch: rd.epoch, then: messages)
            }
            // Where the leader placed this follower's proposals, before the entries of this batch are applied.
            for placed in rd.proposalsPlaced {
                guard let continuation = forwardedProposals.removeValue(forKey: placed.request) else { continue }
                if placed.index <= raft.appliedIndex {
                    // Applied before the answer came (it cannot, over one ordered connection): its result is gone.
                    continuation.resume(throwing: RaftDriverError.outcomeUnknown)
                } else {
                    pendingProposals[placed.index] = PendingProposal(
                        id: placed.request, term: placed.term, continuation: continuation, forwarded: true)
                }
            }
            for request in rd.proposalsRefused {
                forwardedProposals.removeValue(forKey: request)?.resume(throwing: RaftDriverError.refused(.notLeader(leader: nil)))
            }
            for request in rd.proposalsUnknown {
                forwardedProposals.removeValue(forKey: request)?.resume(throwing: RaftDriverError.outcomeUnknown)
            }
            for entry in rd.committedEntries {
                bytesSinceSnapshot += entry.byteSize
                let pending = pendingProposals.removeValue(forKey: entry.index)
                let result: [UInt8] = entry.kind == .normal ? stateMachine.apply(entry, answered: pending != nil) : []
                if let pending {
                    if pending.term == entry.term {
                        pending.continuation.resume(returning: result)
                    } else {
                        pending.continuation.resume(throwing: RaftDriverError.outcomeUnknown)
                    }
                }
            }
            for state in rd.readStates {
                for request in state.requests {
                    if let continuation = pendingReads.removeValue(forKey: request) {
                        confirmedReads.append((state.index, request, .now + options.readApplyLimit, continuation))
                    }
                }
            }
            for request in rd.droppedReads {
                pendingReads.removeValue(forKey: request)?.resume(
                    throwing: RaftDriverError.refused(.notLeader(leader: nil)))
            }
            raft.advance(rd)
            answerConfirmedReads()
        }
    }

    // MARK: - Asynchronous storage writes

    /// Hands a batch to the writer: it makes the batch durable, then sends `messages` (which may claim it: a
    /// follower's acknowledgement), then reports back to the loop (`Raft.persisted`). Batches are written and their
    /// messages sent in the order they were handed over.
    private func persistInBackground(hardState: HardState?, entries: [Entry], epoch: UInt64, then messages: [Message]) {
        guard let writer else { preconditionFailure("a batch to persist in the background without a writer") }
        writesInFlight += 1
        writesQueued.withLock {
            $0.append(QueuedWrite(hardState: hardState, entries: entries, epoch: epoch, messages: messages))
        }
        writer.async { [self] in writeQueued() }
    }

    /// On the writer: makes every queued batch durable in one transaction, sends their messages in order, and
    /// reports each batch to the loop. (A block that finds the queue empty has had its batch taken by the one
    /// before it.)
    private func writeQueued() {
        let batches = writesQueued.withLock { queued in
            defer { queued.removeAll() }
            return queued
        }
        guard !batches.isEmpty else { return }
        var written = false
        if writerFailure.withLock({ $0 }) == nil {
            // Merged as the store would have applied them one by one: a later batch's entries replace every entry
            // from its first index on; the last hard state wins.
            var hardState: HardState? = nil
            var entries: [Entry] = []
            for batch in batches {
                if let hs = batch.hardState { hardState = hs }
                if let first = batch.entries.first {
                    // (Entries run in order: what a batch replaces is at the end, usually nothing.)
                    while let last = entries.last, last.index >= first.index { entries.removeLast() }
                    entries.append(contentsOf: batch.entries)
                }
            }
            do {
                if hardState != nil || !entries.isEmpty { try store.persist(hardState: hardState, entries: entries) }
                for batch in batches { transport.send(batch.messages) }
                written = true
            } catch {
                logger.critical("Raft node stopping: the log store failed", metadata: ["error": "\(error)"])
                writerFailure.withLock { $0 = "\(error)" }
            }
        }
        // Every batch is reported (the loop counts them), but a batch that was not written names no entry.
        let syncs = store.syncCount
        enqueue { inbox in
            for batch in batches {
                let last = written ? batch.entries.last.map { ($0.index, $0.term, batch.epoch) } : nil
                inbox.persisted.append(PersistedWrite(last: last, syncCount: syncs))
            }
        }
    }

    /// Returns once every batch handed to the writer is durable (or failed), and their messages are sent.
    private func waitForWrites() {
        writer?.sync {}
    }

    /// Runs `body` with the store, after every batch handed to the writer and before any handed later.
    private func withStore<T>(_ body: () throws -> T) rethrows -> T {
        guard let writer else { return try body() }
        return try writer.sync(execute: body)
    }

    // MARK: - Snapshots

    /// Installs a snapshot received from the leader: its file is already durable (the stream finished it).
    private func installSnapshot(_ meta: SnapshotMetadata, hardState: HardState?) throws {
        guard let snapshots else { throw RaftDriverError.storageFailed("a snapshot arrived but there is no snapshot folder") }
        let payload = try snapshots.load(meta)
        try store.saveSnapshot(meta, replacingLog: true, hardState: hardState)
        try stateMachine.restore(payload)
        snapshots.removeAll(except: meta)
        snapshotsInstalled += 1
        bytesSinceSnapshot = 0
        lastSnapshotBytes = payload.count
        // Forwarded proposals the snapshot covers were applied into it, not here: their results are gone.
        for (index, p) in pendingProposals where index <= meta.index {
            p.continuation.resume(throwing: RaftDriverError.outcomeUnknown)
            pendingProposals[index] = nil
        }
        logger.info("installed snapshot", metadata: ["index": "\(meta.index)", "term": "\(meta.term)"])
    }

    private func maybeTakeSnapshot() {
        guard let snapshots, !snapshotInProgress,
            raft.appliedIndex >= (raft.snapshot?.index ?? 0) + options.snapshotEntries
                && bytesSinceSnapshot >= lastSnapshotBytes / 4
                || bytesSinceSnapshot >= options.snapshotBytes,
            let meta = raft.snapshotMetadata(at: raft.appliedIndex)
        else { return }
        snapshotInProgress = true
        bytesSinceSnapshot = 0
        let produce = stateMachine.snapshot()
        // Serializing and writing happen off the loop thread: proposals and applies go on meanwhile.
        let thread = Thread { [self] in
            // Below the loop threads in CPU priority: on a busy host the snapshot waits, not the replication.
            // (On Linux the nice value is per thread: 0 names the calling thread.)
            _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 10)
            var error: String? = nil
            var bytes = 0
            let clock = ContinuousClock()
            let started = clock.now
            do {
                let payload = try produce()
                bytes = payload.count
                let produced = clock.now
                try snapshots.write(meta, payload: payload, bytesPerSecond: options.snapshotWriteBytesPerSecond)
                logger.debug(
                    "snapshot written",
                    metadata: [
                        "index": "\(meta.index)", "bytes": "\(payload.count)",
                        "serialize": "\(started.duration(to: produced))", "write": "\(produced.duration(to: clock.now))",
                    ])
            } catch let e {
                error = "\(e)"
            }
            enqueue { $0.snapshotsWritten.append((meta, error, bytes)) }
        }
        thread.name = "raft-\(id)-snapshot"
        thread.start()
    }

    private func snapshotWritten(_ meta: SnapshotMetadata, error: String?, bytes: Int) {
        snapshotInProgress = false
        if let error {
            logger.error("snapshot failed; will retry", metadata: ["index": "\(meta.index)", "error": "\(error)"])
            return
        }
        lastSnapshotBytes = bytes
        // Compact unless a newer snapshot was installed meanwhile.
        let started = ContinuousClock.now
        guard let compacted = raft.compact(through: meta.index) else { return }
        do {
            try withStore { try store.saveSnapshot(compacted, replacingLog: false, hardState: nil) }
            // Unlinking a large file takes a while on some file systems: not on the loop thread.
            if let snapshots {
                Thread { snapshots.removeAll(except: compacted) }.start()
            }
            logger.debug(
                "compacted the log",
                metadata: ["index": "\(compacted.index)", "took": "\(started.duration(to: ContinuousClock.now))"])
        } catch {
            logger.critical("recording a snapshot failed", metadata: ["error": "\(error)"])
            raftStoreFailure = "\(error)"
        }
    }

    private func startSnapshotStream(to peer: NodeID, meta: SnapshotMetadata, term: UInt64) {
        if let existing = outgoing[peer], existing.meta == meta { return }
        guard let snapshots, let size = try? snapshots.fileSize(meta) else {
            raft.reportSnapshot(to: peer, succeeded: false)
            return
        }
        outgoing[peer] = OutgoingSnapshot(meta: meta, term: term, size: size, lastProgress: .now)
    }

    /// Sends what each stream's window allows, and fails streams that stopped making progress.
    private func pumpSnapshotStreams() {
        guard !outgoing.isEmpty else { return }
        if raft.role != .leader {
            outgoing.removeAll()
            return
        }
        for peer in outgoing.keys.sorted() {
            guard var stream = outgoing[peer] else { continue }
            let quiet = ContinuousClock.now - stream.lastProgress
            if quiet > options.snapshotTimeout {
                outgoing[peer] = nil
                raft.reportSnapshot(to: peer, succeeded: false)
                continue
            }
            if quiet > options.snapshotRetransmit && stream.sent > stream.acknowledged {
                // Chunks or their acknowledgements were lost: go back to what the follower holds.
                stream.sent = stream.acknowledged
                stream.lastProgress = .now
            }
            let window = UInt64(options.snapshotChunkBytes * options.snapshotWindow)
            while stream.sent < stream.size && stream.sent - stream.acknowledged < window {
                guard let data = try? snapshots!.readChunk(stream.meta, offset: stream.sent, maxBytes: options.snapshotChunkBytes),
                    !data.isEmpty
                else {
                    outgoing[peer] = nil
                    raft.reportSnapshot(to: peer, succeeded: false)
                    transport.send(SnapshotChunk(kind: .abort, from: id, to: peer, term: stream.term, snapshot: stream.meta, offset: 0))
                    break
                }
                let last = stream.sent + UInt64(data.count) == stream.size
                transport.send(
                    SnapshotChunk(
                        kind: .data, from: id, to: peer, term: stream.term, snapshot: stream.meta, offset: stream.sent,
                        data: data, last: last))
                stream.sent += UInt64(data.count)
            }
            if outgoing[peer] != nil { outgoing[peer] = stream }
        }
    }

    private func receiveChunk(_ chunk: SnapshotChunk) {
        switch chunk.kind {
        case .ack, .abort:
            guard var stream = outgoing[chunk.from], stream.meta == chunk.snapshot else { return }
            if chunk.kind == .abort {
                outgoing[chunk.from] = nil
                raft.reportSnapshot(to: chunk.from, succeeded: false)
                return
            }
            if chunk.offset < stream.acknowledged {
                // The follower started over (it lost its partial file): so does the stream.
                stream.acknowledged = chunk.offset
                stream.sent = chunk.offset
            } else if chunk.offset > stream.acknowledged {
                stream.acknowledged = chunk.offset
            }
            stream.lastProgress = .now
            if stream.acknowledged >= stream.size {
                outgoing[chunk.from] = nil
                raft.reportSnapshot(to: chunk.from, succeeded: true)
            } else {
                outgoing[chunk.from] = stream
            }
        case .data:
            func answer(_ kind: SnapshotChunk.Kind, _ offset: UInt64) {
                transport.send(SnapshotChunk(kind: kind, from: id, to: chunk.from, term: chunk.term, snapshot: chunk.snapshot, offset: offset))
            }
            guard let snapshots else { return answer(.abort, 0) }
            do {
                if chunk.offset == 0 {
                    incoming[chunk.from]?.abort()
                    incoming[chunk.from] = try snapshots.receiver(for: chunk.snapshot)
                }
                guard let receiver = incoming[chunk.from], receiver.meta == chunk.snapshot else {
                    return answer(.ack, 0)  // nothing of it here: start from the beginning
                }
                guard chunk.offset == receiver.received else {
                    return answer(.ack, receiver.received)  // a gap or a repeat: resume from what is here
                }
                try receiver.append(offset: chunk.offset, chunk.data)
                if chunk.last {
                    try receiver.finish()
                    incoming[chunk.from] = nil
                    raft.step(Message(kind: .snapshot, from: chunk.from, to: id, term: chunk.term, snapshot: chunk.snapshot))
                }
                answer(.ack, receiver.received)
            } catch {
                logger.warning("snapshot stream refused", metadata: ["from": "\(chunk.from)", "error": "\(error)"])
                incoming[chunk.from]?.abort()
                incoming[chunk.from] = nil
                answer(.abort, 0)
            }
        }
    }

    private func publish(running: Bool, failure: String?) {
        let s = RaftStatus(
            id: id, role: raft.role, term: raft.term, leader: raft.leader, commitIndex: raft.commitIndex,
            appliedIndex: raft.appliedIndex, lastIndex: raft.lastIndex, syncCount: syncCount, running: running,
            failure: failure, membership: raft.membership, snapshotIndex: raft.snapshot?.index ?? 0,
            snapshotsInstalled: snapshotsInstalled, snapshotting: snapshotInProgress)
        let before = published.withLock { old in
            defer { old = s }
            return (old.role, old.leader, old.term)
        }
        if before.0 != s.role || before.1 != s.leader {
            logger.info(
                "role \(s.role)", metadata: ["term": "\(s.term)", "leader": "\(s.leader)", "was": "\(before.0) of term \(before.2)"])
        }
    }

    private func finish(failure: String?) {
        tickTimer.withLock { timer in
            timer?.cancel()
            timer = nil
        }
        let error: RaftDriverError = failure.map { .storageFailed($0) } ?? .stopped
        for (_, p) in pendingProposals { p.continuation.resume(throwing: error) }
        pendingProposals.removeAll()
        for (_, c) in forwardedProposals { c.resume(throwing: error) }
        forwardedProposals.removeAll()
        for (_, c) in pendingReads { c.resume(throwing: error) }
        pendingReads.removeAll()
        for r in confirmedReads { r.continuation.resume(throwing: error) }
        confirmedReads.removeAll()
        // From here on enqueue() refuses: nothing new can arrive, and everything queued is answered.
        condition.lock()
        let leftover = inbox
        inbox = Inbox()
        inbox.stopping = true
        finished = true
        condition.unlock()
        for call in leftover.proposals + leftover.forwardable { call.continuation.resume(throwing: error) }
        for call in leftover.reads { call.continuation.resume(throwing: error) }
        for (_, c) in leftover.confChanges { c.resume(throwing: error) }
        for (_, c) in leftover.transfers { c.resume(throwing: error) }
        for (_, receiver) in incoming { receiver.abort() }
        incoming.removeAll()
        waitForWrites()
        syncCount = store.syncCount
        publish(running: false, failure: failure)
        store.close()
        done.lock()
        loopEnded = true
        done.broadcast()
        done.unlock()
    }
}

/// An in-process transport between drivers, for the demonstration cluster, benchmarks and tests.
/// A node can be cut off (its messages in both directions are dropped), and messages can be dropped by a filter.
public final class LocalTransport: Sendable {
    private let state = Mutex<(nodes: [NodeID: RaftDriver], down: Set<NodeID>)>(([:], []))
    private let filter = Mutex<(@Sendable (Message) -> Bool)?>(nil)

    public init() {}

    public func register(_ driver: RaftDriver) {
        state.withLock { $0.nodes[driver.id] = driver }
    }

    public func unregister(_ id: NodeID) {
        state.withLock { _ = $0.nodes.removeValue(forKey: id) }
    }

    public func setDown(_ id: NodeID, _ down: Bool) {
        state.withLock {
            if down { $0.down.insert(id) } else { $0.down.remove(id) }
        }
    }

    /// Messages for which `keep` answers false are dropped (nil: none are).
    public func setFilter(_ keep: (@Sendable (Message) -> Bool)?) {
        filter.withLock { $0 = keep }
    }

    /// The transport a node uses to send.
    public func endpoint(for id: NodeID) -> any RaftTransport {
        Endpoint(from: id, transport: self)
    }

    fileprivate func deliver(from: NodeID, _ messages: [Message]) {
        var byTarget: [NodeID: [Message]] = [:]
        let keep = filter.withLock { $0 }
        for m in messages where keep?(m) ?? true { byTarget[m.to, default: []].append(m) }
        let targets: [(RaftDriver, [Message])] = state.withLock { s in
            if s.down.contains(from) { return [] }
            return byTarget.compactMap { to, ms in
                guard !s.down.contains(to), let driver = s.nodes[to] else { return nil }
                return (driver, ms)
            }
        }
        for (driver, ms) in targets { driver.receive(ms) }
    }

    fileprivate func deliver(_ chunk: SnapshotChunk) {
        let target: RaftDriver? = state.withLock { s in
            s.down.contains(chunk.from) || s.down.contains(chunk.to) ? nil : s.nodes[chunk.to]
        }
        target?.receive(chunk)
    }

    private struct Endpoint: RaftTransport {
        let from: NodeID
        let transport: LocalTransport
        func send(_ messages: [Message]) {
            guard !messages.isEmpty else { return }
            transport.deliver(from: from, messages)
        }
        func send(_ chunk: SnapshotChunk) {
            transport.deliver(chunk)
        }
    }
}
