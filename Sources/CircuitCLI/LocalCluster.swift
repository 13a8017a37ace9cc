import CircuitRaft
import Foundation
import Logging

/// A state machine that counts what it applies and folds it into a running hash, so replicas can be compared.
final class ChecksumStateMachine: RaftStateMachine {
    private(set) var count = 0
    private(set) var hash: UInt64 = 0xCBF2_9CE4_8422_2325
    private(set) var lastIndex: UInt64 = 0

    func apply(_ entry: Entry) -> [UInt8] {
        count += 1
        lastIndex = entry.index
        for byte in entry.data {
            hash = (hash ^ UInt64(byte)) &* 0x100_0000_01B3
        }
        hash = (hash ^ entry.index) &* 0x100_0000_01B3
        return []
    }

    func snapshot() -> @Sendable () throws -> [UInt8] {
        let state = [UInt64(count), hash, lastIndex]
        return { state.flatMap { v in withUnsafeBytes(of: v.bigEndian) { Array($0) } } }
    }

    func restore(_ payload: [UInt8]) throws {
        guard payload.count == 24 else { throw ClusterError.mismatch("a checksum snapshot of \(payload.count) bytes") }
        let words = stride(from: 0, to: 24, by: 8).map { i in payload[i..<i + 8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
        count = Int(words[0])
        hash = words[1]
        lastIndex = words[2]
    }
}

/// Several Raft nodes in one process, each with its own SQLite store on disk and its own thread, joined by an
/// in-memory transport. Used by the demonstration and the benchmark.
final class LocalCluster: @unchecked Sendable {
    let directory: String
    let ids: [NodeID]
    let transport = LocalTransport()
    let logger: Logger
    let options: RaftDriver.Options
    private let lock = NSLock()
    private var drivers: [NodeID: RaftDriver] = [:]
    private var machines: [NodeID: any RaftStateMachine] = [:]

    init(
        directory: String, size: Int, options: RaftDriver.Options = .init(), logger: Logger,
        makeMachine: () -> any RaftStateMachine = { ChecksumStateMachine() }
    ) throws {
        self.directory = directory
        self.ids = (1...size).map { NodeID($0) }
        self.logger = logger
        self.options = options
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        for id in ids { try start(id, machine: makeMachine()) }
    }

    func storePath(_ id: NodeID) -> String { "\(directory)/node-\(id).sqlite" }

    /// Starts (or restarts) node `id` from what its store holds. A node not among the initial voters starts
    /// knowing no membership: it joins when the leader adds it.
    func start(_ id: NodeID, machine: any RaftStateMachine = ChecksumStateMachine()) throws {
        let store = try SQLiteLogStore(path: storePath(id), logger: logger)
        let snapshots = try SnapshotFiles(directory: "\(directory)/node-\(id)-snapshots", logger: logger)
        let driver = try RaftDriver(
            config: RaftConfig(id: id, voters: ids.contains(id) ? ids : []), store: store, stateMachine: machine,
            transport: transport.endpoint(for: id), snapshots: snapshots, options: options, logger: logger)
        lock.withLock {
            drivers[id] = driver
            machines[id] = machine
        }
        transport.register(driver)
        driver.start()
    }

    /// Stops node `id` abruptly: its thread ends after its current turn, unanswered requests fail, and only what it
    /// made durable remains.
    func kill(_ id: NodeID) {
        transport.unregister(id)
        lock.withLock { drivers.removeValue(forKey: id) }?.stop()
    }

    func shutdown() {
        for id in ids { kill(id) }
    }

    var liveIDs: [NodeID] { lock.withLock { drivers.keys.sorted() } }

    /// Stops node `id` gracefully: a leader hands over first.
    func stopGracefully(_ id: NodeID) async {
        guard let driver = driver(id) else { return }
        await driver.shutdown()
        transport.unregister(id)
        lock.withLock { _ = drivers.removeValue(forKey: id) }
    }

    func driver(_ id: NodeID) -> RaftDriver? { lock.withLock { drivers[id] } }

    func machine(_ id: NodeID) -> ChecksumStateMachine? { lock.withLock { machines[id] as? ChecksumStateMachine } }

    func statuses() -> [RaftStatus] { liveIDs.compactMap { driver($0)?.status } }

    /// The live leader with the highest term, if any.
    var leader: NodeID? {
        statuses().filter { $0.role == .leader }.max { $0.term < $1.term }?.id
    }

    /// Waits until `condition` holds, polling, or throws after `timeout`.
    func wait(_ what: String, timeout: Duration = .seconds(10), until condition: () -> Bool) async throws {
        let deadline = ContinuousClock.now + timeout
        while !condition() {
            if ContinuousClock.now > deadline { throw ClusterError.timedOut(what) }
            try await Task.sleep(for: .milliseconds(5))
        }
    }

    func waitForLeader(timeout: Duration = .seconds(10)) async throws -> NodeID {
        try await wait("a leader", timeout: timeout) { leader != nil }
        return leader!
    }

    /// Proposes through whoever leads, retrying refusals until `timeout`. Returns how many attempts it took.
    @discardableResult
    func propose(_ data: [UInt8], timeout: Duration = .seconds(10)) async throws -> Int {
        let deadline = ContinuousClock.now + timeout
        var attempts = 0
        while true {
            attempts += 1
            if let id = leader, let driver = driver(id) {
                do {
                    _ = try await driver.propose(data)
                    return attempts
                } catch let error as RaftDriverError {
                    if ContinuousClock.now > deadline { throw error }
                }
            }
            if ContinuousClock.now > deadline { throw ClusterError.timedOut("committing a proposal") }
            try await Task.sleep(for: .milliseconds(2))
        }
    }
}

enum ClusterError: Error, CustomStringConvertible {
    case timedOut(String)
    case mismatch(String)
    var description: String {
        switch self {
        case .timedOut(let what): return "timed out waiting for \(what)"
        case .mismatch(let what): return what
        }
    }
}

func temporaryDirectory(_ prefix: String) -> String {
    FileManager.default.temporaryDirectory.appendingPathComponent("\(prefix)-\(UUID().uuidString.prefix(8))").path
}

extension Duration {
    var milliseconds: Double { self / .milliseconds(1) }
}
