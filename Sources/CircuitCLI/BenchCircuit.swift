import CircuitClient
import CircuitNode
import Foundation
import NIOCore
import NIOHTTP1

/// Circuit as a compared system: three daemons of this binary on loopback (`DaemonProcesses`, as `circuit dev` runs
/// them), driven through the binary protocol (`WireConnection`), or with `http` through the HTTP API. Keys are
/// records: `/bench/k00000042` is `/records/bench/k00000042`. Watches are the HTTP API's either way.
final class CircuitSystem: ComparedSystem {
    let name: String
    let version: String
    private let daemons: DaemonProcesses
    private let http: Bool

    init(binary: String, base: String, http: Bool = false) throws {
        self.http = http
        daemons = try DaemonProcesses(binary: binary, base: "\(base)/circuit\(http ? "-http" : "")", count: 3, portRange: cliPortRange)
        name = http ? "Circuit (HTTP)" : "Circuit"
        version = http ? "Circuit (this build, HTTP API)" : "Circuit (this build)"
    }

    func start() async throws {
        try daemons.startAll()
        _ = try await daemons.leader()
        _ = try await daemons.allAlive()
        for i in 0..<3 { _ = try await daemons.client(i).put("/records/bench/_ready", Array("1".utf8)) }
    }

    func stop() { daemons.stopAll(signal: SIGKILL) }

    func connect(_ member: Int) async throws -> any ComparedConnection {
        let address = daemons.members[member].api
        let parts = address.split(separator: ":")
        let connection = try await BenchHTTPConnection.open(host: String(parts[0]), port: Int(parts[1]) ?? 0)
        if http { return CircuitComparedConnection(http: connection) }
        return CircuitWireComparedConnection(wire: try await WireConnection.connect(to: address, tls: nil), http: connection)
    }

    func leader() async throws -> Int { try await daemons.leader(timeout: .seconds(10)) }
    func kill9(_ member: Int) { daemons.kill9(member) }

    func restart(_ member: Int) async throws {
        try daemons.start(member)
        _ = try await daemons.leader()
        _ = try await daemons.allAlive()
    }

    func residentBytes(_ member: Int) -> Int { daemons.residentBytes(member) }
    /// The data folder without the daemon's log (etcd's and ZooKeeper's logs are not counted either).
    func diskBytes(_ member: Int) -> Int { allocatedBytes(under: daemons.members[member].folder.path, excluding: ["daemon.log"]) }
}

/// One client's keep-alive connection to one daemon's API, plus a watch stream per watch.
final class CircuitComparedConnection: ComparedConnection {
    private let http: BenchHTTPConnection
    private let watches = TaskList()

    init(http: BenchHTTPConnection) { self.http = http }

    var taskExecutor: any TaskExecutor { http.taskExecutor }

    func put(_ key: String, _ value: [UInt8]) async throws {
        let answer = try await http.request(.PUT, "/v1/records" + key, body: ByteBuffer(bytes: value))
        guard answer.status == 200 else { throw Self.failure("PUT", key, answer) }
    }

    /// A default GET: linearizable (a read barrier through the leader).
    func read(_ key: String) async throws -> Int64 {
        let answer = try await http.request(.GET, "/v1/records" + key, body: nil)
        if answer.status == 404 { return 0 }
        guard answer.status == 200 else { throw Self.failure("GET", key, answer) }
        return try JSONDecoder().decode(Versioned.self, from: Data(answer.body.readableBytesView)).version
    }

    func compareAndSet(_ key: String, version: Int64, _ value: [UInt8]) async throws -> Int64? {
        let answer = try await http.request(.PUT, "/v1/records\(key)?version=\(version)", body: ByteBuffer(bytes: value))
        if answer.status == 409 { return nil }
        guard answer.status == 200 else { throw Self.failure("PUT", key, answer) }
        return try JSONDecoder().decode(Versioned.self, from: Data(answer.body.readableBytesView)).version
    }

    /// A watch from the revision after a linearizable read's: every write after `watch` returns has a later revision,
    /// so the stream delivers it however late it connects.
    func watch(_ key: String, changed: @escaping @Sendable () -> Void) async throws {
        let now = try await http.request(.GET, "/v1/records" + key, body: nil)
        guard now.status == 200 else { throw Self.failure("GET", key, now) }
        let revision = try JSONDecoder().decode(Revisioned.self, from: Data(now.body.readableBytesView)).revision
        let address = http.address
        let task = Task {
            _ = try? await HTTPExchange.stream("/v1/watch/records\(key)?from=\(revision + 1)", to: address) { _ in changed() }
        }
        watches.add(task)
    }

    func close() async {
        watches.cancelAll()
        await http.close()
    }

    private struct Versioned: Decodable { let version: Int64 }
    private struct Revisioned: Decodable { let revision: Int64 }

    private static func failure(_ method: String, _ key: String, _ answer: (status: Int, body: ByteBuffer)) -> ComparedError {
        ComparedError("Circuit \(method) \(key): HTTP \(answer.status) \(String(buffer: answer.body))")
    }
}

/// One client's wire connection to one daemon (`WireConnection`) for the writes and reads, and an HTTP one for its
/// watches (a stream each).
final class CircuitWireComparedConnection: ComparedConnection {
    private let wire: WireConnection
    private let http: CircuitComparedConnection

    init(wire: WireConnection, http: BenchHTTPConnection) {
        self.wire = wire
        self.http = CircuitComparedConnection(http: http)
    }

    var taskExecutor: any TaskExecutor { wire.taskExecutor }

    func put(_ key: String, _ value: [UInt8]) async throws {
        try await wire.put(key, value)
    }

    /// A linearizable read (a read barrier through the leader).
    func read(_ key: String) async throws -> Int64 {
        do {
            return Int64(try await wire.get(key).version)
        } catch {
            if Self.code(of: error) == "not_found" { return 0 }
            throw error
        }
    }

    func compareAndSet(_ key: String, version: Int64, _ value: [UInt8]) async throws -> Int64? {
        do {
            return Int64(try await wire.put(key, value, version: UInt64(version)).version)
        } catch {
            if ["version_mismatch", "exists"].contains(Self.code(of: error)) { return nil }
            throw error
        }
    }

    /// The API's error code, if the cluster answered with an error.
    private static func code(of error: CircuitClientError) -> String? {
        if case .api(let e) = error { return e.code }
        return nil
    }

    func watch(_ key: String, changed: @escaping @Sendable () -> Void) async throws {
        try await http.watch(key, changed: changed)
    }

    func close() async {
        await wire.close()
        await http.close()
    }
}

/// Allocated bytes (`du` style: st_blocks × 512) of a folder and everything under it but `excluding` (paths relative
/// to it).
func allocatedBytes(under root: String, excluding: Set<String> = []) -> Int {
    func allocated(_ path: String) -> Int {
        var s = stat()
        return lstat(path, &s) == 0 ? Int(s.st_blocks) * 512 : 0
    }
    var total = allocated(root)
    if let entries = FileManager.default.enumerator(atPath: root) {
        for case let relative as String in entries where !excluding.contains(relative) {
            total += allocated("\(root)/\(relative)")
        }
    }
    return total
}
