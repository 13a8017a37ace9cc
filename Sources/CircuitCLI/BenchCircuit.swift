import CircuitClient
import CircuitNode
import Foundation
import NIOCore
import NIOHTTP1

/// Circuit as a compared system: three daemons of this binary on loopback (`DaemonProcesses`, as `circuit dev` runs
/// them), driven through the HTTP API. Keys are records: `/bench/k00000042` is `/records/bench/k00000042`.
final class CircuitSystem: ComparedSystem {
    let name = "Circuit"
    let version: String
    private let daemons: DaemonProcesses

    init(binary: String, base: String) throws {
        daemons = try DaemonProcesses(binary: binary, base: "\(base)/circuit", count: 3, portRange: cliPortRange)
        version = "Circuit (this build)"
    }

    func start() async throws {
        try daemons.startAll()
        _ = try await daemons.leader()
        _ = try await daemons.allAlive()
        for i in 0..<3 { _ = try await daemons.client(i).put("/records/bench/_ready", Array("1".utf8)) }
    }

    func stop() { daemons.stopAll(signal: SIGKILL) }

    func connect(_ member: Int) async throws -> any ComparedConnection {
        let parts = daemons.members[member].api.split(separator: ":")
        return CircuitComparedConnection(http: try await BenchHTTPConnection.open(host: String(parts[0]), port: Int(parts[1]) ?? 0))
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
