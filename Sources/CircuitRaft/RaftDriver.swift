import Foundation
import Logging
import Synchronization

/// Carries messages to peers. `send` must not block; a message may be lost (Raft retries).
public protocol RaftTransport: Sendable {
    func send(_ messages: [Message])
}

/// The replicated state machine. Called only from the driver's thread, in log order.
public protocol RaftStateMachine: AnyObject {
    /// Applies one committed entry and returns the answer for whoever proposed it.
    func apply(_ entry: Entry) -> [UInt8]
}

/// Why a proposal or read through the driver failed.
public enum RaftDriverError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The protocol refused it (not the leader, entry too large).
    case refused(RaftRefusal)
    /// This node lost leadership before the proposal committed: it may or may not commit later.
    case outcomeUnknown
    /// The driver stopped (or failed) before an answer.
    case stopped
    /// The log store failed: the node stopped.
    case storageFailed(String)

    public var description: String {
        switch self {
        case .refused(let r): return r.description
        case .outcomeUnknown: return "leadership changed before the proposal committed; it may or may not be applied"
        case .stopped: return "the Raft node has stopped"
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
}

/// The I/O shell around `Raft`: one dedicated thread that runs the Ready loop.
///
/// Each turn takes everything that arrived (messages, proposals, reads, a due tick), steps it into the protocol, then
/// persists the whole batch in one transaction (one fsync for every proposal that arrived meanwhile: group commit),
/// sends, applies and advances. The thread is not one of Swift's cooperative threads, so fsync never stalls them.
public final class RaftDriver: @unchecked Sendable {
    public struct Options: Sendable {
        /// Length of one protocol tick. Default 50 ms (with the protocol's defaults: heartbeats every 50 ms and
        /// elections after 500 to 1000 ms of silence).
        public var tickInterval: Duration = .milliseconds(50)
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
    private var pendingProposals: [UInt64: (term: UInt64, continuation: CheckedContinuation<[UInt8], any Error>)] = [:]
    private var pendingReads: [UInt64: CheckedContinuation<UInt64, any Error>] = [:]
    private var confirmedReads: [(index: UInt64, continuation: CheckedContinuation<UInt64, any Error>)] = []
    private var nextReadID: UInt64 = 1

    // Shared between callers and the loop thread, under `condition`.
    private let condition = NSCondition()
    private var inbox = Inbox()
    private var thread: Thread?
    private let done = NSCondition()
    private var finished = false

    private let published: Mutex<RaftStatus>

    private struct Inbox {
        var messages: [Message] = []
        var proposals: [([UInt8], CheckedContinuation<[UInt8], any Error>)] = []
        var reads: [CheckedContinuation<UInt64, any Error>] = []
        var campaign = false
        var stopping = false
        var isEmpty: Bool { messages.isEmpty && proposals.isEmpty && reads.isEmpty && !campaign && !stopping }
    }

    /// A driver for the node described by `config`, resuming from what `store` holds.
    public init(
        config: RaftConfig, store: any RaftLogStore, stateMachine: any RaftStateMachine, transport: any RaftTransport,
        options: Options = Options(), logger: Logger
    ) throws {
        let recovered = try store.recover()
        self.raft = try Raft(config: config, hardState: recovered.hardState, entries: recovered.entries)
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
                lastIndex: recovered.entries.last?.index ?? 0, syncCount: store.syncCount, running: false))
    }

    public var status: RaftStatus { published.withLock { $0 } }

    /// Starts the loop thread.
    public func start() {
        published.withLock { $0.running = true }
        let thread = Thread { [self] in
            self.loop()
        }
        thread.name = "raft-\(id)"
        thread.stackSize = 8 << 20
        self.thread = thread
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
        while thread != nil && !finished { done.wait() }
        done.unlock()
    }

    /// Messages from peers.
    public func receive(_ messages: [Message]) {
        guard !messages.isEmpty else { return }
        condition.lock()
        inbox.messages.append(contentsOf: messages)
        condition.signal()
        condition.unlock()
    }

    /// Starts an election at once.
    public func campaign() {
        condition.lock()
        inbox.campaign = true
        condition.signal()
        condition.unlock()
    }

    /// Proposes `data`; returns the state machine's answer once it is committed and applied here.
    public func propose(_ data: [UInt8]) async throws -> [UInt8] {
        try await withCheckedThrowingContinuation { continuation in
            condition.lock()
            if inbox.stopping || finished {
                condition.unlock()
                continuation.resume(throwing: RaftDriverError.stopped)
                return
            }
            inbox.proposals.append((data, continuation))
            condition.signal()
            condition.unlock()
        }
    }

    /// A linearizable read barrier (ReadIndex): returns once this node's state machine has applied everything
    /// committed before the call, with leadership confirmed by a quorum. Only the leader answers.
    public func readBarrier() async throws -> UInt64 {
        try await withCheckedThrowingContinuation { continuation in
            condition.lock()
            if inbox.stopping || finished {
                condition.unlock()
                continuation.resume(throwing: RaftDriverError.stopped)
                return
            }
            inbox.reads.append(continuation)
            condition.signal()
            condition.unlock()
        }
    }

    // MARK: - The loop

    private func loop() {
        let tick = Double(options.tickInterval.components.seconds)
            + Double(options.tickInterval.components.attoseconds) / 1e18
        var nextTick = Date().addingTimeInterval(tick)
        var failure: String? = nil
        while true {
            condition.lock()
            while inbox.isEmpty && Date() < nextTick {
                _ = condition.wait(until: nextTick)
            }
            let batch = inbox
            inbox = Inbox()
            condition.unlock()
            if batch.stopping { break }

            let now = Date()
            if now >= nextTick {
                raft.tick()
                nextTick = nextTick.addingTimeInterval(tick)
                if nextTick < now { nextTick = now.addingTimeInterval(tick) }
            }
            if batch.campaign { raft.campaign() }
            for m in batch.messages { raft.step(m) }
            if !batch.proposals.isEmpty { propose(batch.proposals) }
            for continuation in batch.reads {
                let request = nextReadID
                nextReadID += 1
                if let refusal = raft.readIndex(request: request) {
                    continuation.resume(throwing: RaftDriverError.refused(refusal))
                } else {
                    pendingReads[request] = continuation
                }
            }
            do {
                try drainReady()
            } catch {
                failure = "\(error)"
                logger.critical("Raft node stopping: the log store failed", metadata: ["error": "\(error)"])
                break
            }
            if raft.role != .leader && !pendingProposals.isEmpty {
                for (_, p) in pendingProposals { p.continuation.resume(throwing: RaftDriverError.outcomeUnknown) }
                pendingProposals.removeAll()
            }
            publish(running: true, failure: nil)
        }
        finish(failure: failure)
    }

    private func propose(_ proposals: [([UInt8], CheckedContinuation<[UInt8], any Error>)]) {
        switch raft.propose(proposals.map(\.0)) {
        case .success(let ticket):
            var index = ticket.firstIndex
            for (_, continuation) in proposals {
                pendingProposals[index] = (ticket.term, continuation)
                index += 1
            }
        case .failure(let refusal):
            for (_, continuation) in proposals { continuation.resume(throwing: RaftDriverError.refused(refusal)) }
        }
    }

    private func drainReady() throws {
        while raft.hasReady {
            let rd = raft.ready()
            transport.send(rd.messagesBeforePersist)
            try store.persist(hardState: rd.hardState, entries: rd.entries)
            transport.send(rd.messages)
            for entry in rd.committedEntries {
                let result: [UInt8] = entry.kind == .normal ? stateMachine.apply(entry) : []
                if let pending = pendingProposals.removeValue(forKey: entry.index) {
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
                        confirmedReads.append((state.index, continuation))
                    }
                }
            }
            for request in rd.droppedReads {
                pendingReads.removeValue(forKey: request)?.resume(
                    throwing: RaftDriverError.refused(.notLeader(leader: nil)))
            }
            raft.advance(rd)
            if !confirmedReads.isEmpty {
                let applied = raft.appliedIndex
                confirmedReads.removeAll { read in
                    guard read.index <= applied else { return false }
                    read.continuation.resume(returning: applied)
                    return true
                }
            }
        }
    }

    private func publish(running: Bool, failure: String?) {
        let s = RaftStatus(
            id: id, role: raft.role, term: raft.term, leader: raft.leader, commitIndex: raft.commitIndex,
            appliedIndex: raft.appliedIndex, lastIndex: raft.lastIndex, syncCount: store.syncCount, running: running,
            failure: failure)
        published.withLock { $0 = s }
    }

    private func finish(failure: String?) {
        let error: RaftDriverError = failure.map { .storageFailed($0) } ?? .stopped
        for (_, p) in pendingProposals { p.continuation.resume(throwing: error) }
        pendingProposals.removeAll()
        for (_, c) in pendingReads { c.resume(throwing: error) }
        pendingReads.removeAll()
        for r in confirmedReads { r.continuation.resume(throwing: error) }
        confirmedReads.removeAll()
        condition.lock()
        let leftover = inbox
        inbox = Inbox()
        inbox.stopping = true
        condition.unlock()
        for (_, c) in leftover.proposals { c.resume(throwing: error) }
        for c in leftover.reads { c.resume(throwing: error) }
        publish(running: false, failure: failure)
        store.close()
        done.lock()
        finished = true
        done.broadcast()
        done.unlock()
    }
}

/// An in-process transport between drivers, for the demonstration cluster, benchmarks and tests.
/// A node can be cut off (its messages in both directions are dropped).
public final class LocalTransport: Sendable {
    private let state = Mutex<(nodes: [NodeID: RaftDriver], down: Set<NodeID>)>(([:], []))

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

    /// The transport a node uses to send.
    public func endpoint(for id: NodeID) -> any RaftTransport {
        Endpoint(from: id, transport: self)
    }

    fileprivate func deliver(from: NodeID, _ messages: [Message]) {
        var byTarget: [NodeID: [Message]] = [:]
        for m in messages { byTarget[m.to, default: []].append(m) }
        let targets: [(RaftDriver, [Message])] = state.withLock { s in
            if s.down.contains(from) { return [] }
            return byTarget.compactMap { to, ms in
                guard !s.down.contains(to), let driver = s.nodes[to] else { return nil }
                return (driver, ms)
            }
        }
        for (driver, ms) in targets { driver.receive(ms) }
    }

    private struct Endpoint: RaftTransport {
        let from: NodeID
        let transport: LocalTransport
        func send(_ messages: [Message]) {
            guard !messages.isEmpty else { return }
            transport.deliver(from: from, messages)
        }
    }
}
