import CircuitClient
import CircuitNode
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

// etcd 3.4's v3 JSON gateway (grpc-gateway), as checked against etcd 3.4.23 (Debian `etcd-server`) with curl and raw
// sockets:
// - Every call is `POST /v3/...` with a JSON body; keys and values are base64. Field names are accepted in both
//   snake_case and lowerCamelCase (`request_put` = `requestPut`); int64/uint64 are strings in answers
//   (`"version":"1"`, `"member_id":"14688254636154656760"`, beyond Int64) and accepted as strings or numbers.
// - Fields at their zero value are omitted: a range of an absent key answers only `{"header":{...}}` (no `kvs`, no
//   `count`); a failed txn has no `succeeded` and no `responses`; a status without a leader has no `leader` (and
//   `"errors":["etcdserver: no leader"]`).
// - Unary answers carry Content-Length and the connection stays open (keep-alive). Errors: HTTP 400 for a bad
//   request, 503 `{"error":"etcdserver: request timed out","code":14,...}` after ~7 s without a quorum.
// - `/v3/watch` answers `Transfer-Encoding: chunked`, one chunk per message, each message one JSON object ending in
//   "\n" and wrapped in `{"result":{...}}`: first `{"result":{"header":{...},"created":true}}`, then
//   `{"result":{"header":{...},"events":[{"kv":{...}}]}}` (a put event has no `type`: PUT is the zero value).
//   Lines are reassembled (`HTTPExchange.stream`), since the HTTP decoder may split a chunk.
// - The WAL preallocates 64 MB segments (`0.tmp` and the first `.wal`): a fresh member's data folder already takes
//   ~125 MB of blocks.

/// etcd as a compared system: three `etcd` processes on loopback, every default kept (fsync on, heartbeat 100 ms,
/// election 1000 ms). Sendable: its only mutable state is the member table behind a Mutex.
final class EtcdSystem: ComparedSystem {
    let name = "etcd"
    let version: String
    /// Parent of the members' folders (`etcd1`, `etcd2`, `etcd3`: `data/` and `etcd.log` each).
    let base: String
    /// The `etcd` executable, nil if not installed.
    private let binary: String?

    private struct Member: Sendable {
        let name: String
        let folder: String
        let client: Int
        let peer: Int
        var process: Process?
        var dataDir: String { "\(folder)/data" }
        var clientAddress: String { "127.0.0.1:\(client)" }
    }

    private let table = Mutex<[Member]>([])
    private let token = Mutex<String>("")
    private var members: [Member] { table.withLock { $0 } }

    init(base: String) {
        self.base = base
        let binary = Self.locate()
        self.binary = binary
        version = binary.flatMap(Self.askVersion) ?? "etcd 3.4"
    }

    private static func locate() -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        let folders = ["/usr/bin", "/usr/local/bin"] + path.split(separator: ":").map(String.init)
        return folders.map { "\($0)/etcd" }.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// "etcd 3.4.23" from the first line of `etcd --version` ("etcd Version: 3.4.23").
    private static func askVersion(_ binary: String) -> String? {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = ["--version"]
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = FileHandle.nullDevice
        guard (try? process.run()) != nil else { return nil }
        let data = try? pipe.fileHandleForReading.readToEnd()
        process.waitUntilExit()
        guard let data, let first = String(decoding: data, as: UTF8.self).split(separator: "\n").first,
            let number = first.split(separator: " ").last, first.hasPrefix("etcd Version:")
        else { return nil }
        return "etcd \(number)"
    }

    func start() async throws {
        guard binary != nil else {
            throw ComparedError("etcd is not installed (no `etcd` in /usr/bin, /usr/local/bin or PATH): apt-get install etcd-server")
        }
        stop()
        var planned: [Member] = []
        for i in 0..<3 {
            let folder = "\(base)/etcd\(i + 1)"
            // Fresh: a data folder left by an earlier run would restart that old cluster instead.
            try? FileManager.default.removeItem(atPath: folder)
            try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
            let client = try freePort(in: cliPortRange)
            let peer = try freePort(in: cliPortRange)
            planned.append(Member(name: "etcd\(i + 1)", folder: folder, client: client, peer: peer, process: nil))
        }
        // A token of its own per run: members of another cluster on these ports could not join by mistake.
        token.withLock { $0 = "circuit-bench-\(UUID().uuidString.prefix(8))" }
        table.withLock { $0 = planned }
        for i in 0..<3 { try launch(i) }
        try await waitServing([0, 1, 2])
    }

    /// Starts member `i`'s process. The same arguments serve a restart: with a data folder present etcd ignores the
    /// `--initial-*` flags and recovers from its WAL.
    private func launch(_ i: Int) throws {
        guard let binary else { throw ComparedError("etcd is not installed: apt-get install etcd-server") }
        let all = members
        let m = all[i]
        let cluster = all.map { "\($0.name)=http://127.0.0.1:\($0.peer)" }.joined(separator: ",")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = [
            "--name", m.name, "--data-dir", m.dataDir,
            "--listen-client-urls", "http://\(m.clientAddress)", "--advertise-client-urls", "http://\(m.clientAddress)",
            "--listen-peer-urls", "http://127.0.0.1:\(m.peer)", "--initial-advertise-peer-urls", "http://127.0.0.1:\(m.peer)",
            "--initial-cluster", cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", token.withLock { $0 },
        ]
        // etcd 3.4 logs to stderr; both streams go to the member's log, appended across restarts.
        let log = "\(m.folder)/etcd.log"
        if !FileManager.default.fileExists(atPath: log) { _ = FileManager.default.createFile(atPath: log, contents: nil) }
        let handle = FileHandle(forWritingAtPath: log)
        handle?.seekToEndOfFile()
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = handle ?? FileHandle.nullDevice
        process.standardError = handle ?? FileHandle.nullDevice
        try process.run()
        table.withLock { $0[i].process = process }
    }

    /// Waits until a put through each of `indices` succeeds (30 s at most): the members serve and have a quorum.
    private func waitServing(_ indices: [Int], timeout: Duration = .seconds(30)) async throws {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        let key = etcdBase64("/bench/_ready")
        let value = etcdBase64("1")
        let body = Array(#"{"key":"\#(key)","value":"\#(value)"}"#.utf8)
        var pending = indices
        var said: [Int: String] = [:]
        while !pending.isEmpty {
            for i in pending {
                try checkRunning(i)
                do {
                    let answer = try await HTTPExchange.perform(
                        .POST, "/v3/kv/put", to: members[i].clientAddress, body: body, timeout: .seconds(2))
                    if answer.status == 200 {
                        pending.removeAll { $0 == i }
                    } else {
                        said[i] = "HTTP \(answer.status) \(String(decoding: answer.body, as: UTF8.self))"
                    }
                } catch {
                    said[i] = "\(error)"
                }
            }
            if pending.isEmpty { return }
            guard clock.now < deadline else {
                let report = pending.map { "member \($0): \(said[$0] ?? "no answer")\n\(logTail($0))" }.joined(separator: "\n")
                throw ComparedError("etcd: no write through every member within \(timeout); logs under \(base):\n\(report)")
            }
            try await Task.sleep(for: .milliseconds(50))
        }
    }

    private func checkRunning(_ i: Int) throws {
        if let p = members[i].process, !p.isRunning {
            throw ComparedError("etcd member \(i) exited with status \(p.terminationStatus); its log ends:\n\(logTail(i))")
        }
    }

    private func logTail(_ i: Int, lines: Int = 12) -> String {
        let text = (try? String(contentsOfFile: "\(members[i].folder)/etcd.log", encoding: .utf8)) ?? ""
        return text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
    }

    func stop() {
        let all = members
        for m in all { if let p = m.process, p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        for i in all.indices {
            all[i].process?.waitUntilExit()
            table.withLock { $0[i].process = nil }
        }
    }

    func connect(_ member: Int) async throws -> any ComparedConnection {
        let all = members
        guard all.indices.contains(member) else { throw ComparedError("etcd: no member \(member) (not started?)") }
        return try await EtcdConnection.open(host: "127.0.0.1", port: all[member].client)
    }

    /// The member whose own status names itself leader (`leader` == `header.member_id`): a follower may still name a
    /// leader just killed until its election timeout, the leader itself cannot.
    func leader() async throws -> Int {
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(10)
        let body = Array("{}".utf8)
        while true {
            var said: [String] = []
            for (i, m) in members.enumerated() where m.process != nil {
                do {
                    let answer = try await HTTPExchange.perform(
                        .POST, "/v3/maintenance/status", to: m.clientAddress, body: body, timeout: .seconds(1))
                    let status = try JSONDecoder().decode(EtcdStatusAnswer.self, from: Data(answer.body))
                    if answer.status == 200, let leader = status.leader, leader == status.header?.member_id { return i }
                    said.append("member \(i): HTTP \(answer.status), leader \(status.leader ?? "none")")
                } catch {
                    said.append("member \(i): \(error)")
                }
            }
            guard clock.now < deadline else {
                throw ComparedError("etcd: no member leads after 10 s (\(said.joined(separator: "; ")))")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    func kill9(_ member: Int) {
        let all = members
        guard all.indices.contains(member), let p = all[member].process else { return }
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        table.withLock { $0[member].process = nil }
    }

    func restart(_ member: Int) async throws {
        guard members.indices.contains(member) else { throw ComparedError("etcd: no member \(member) (not started?)") }
        kill9(member)
        try launch(member)
        try await waitServing([member])
    }

    func residentBytes(_ member: Int) -> Int {
        let all = members
        guard all.indices.contains(member), let p = all[member].process else { return 0 }
        return CircuitNode.residentBytes(of: p.processIdentifier)
    }

    /// Allocated blocks (`du` style, st_blocks × 512) of the data folder and everything under it; the log beside it
    /// is not counted.
    func diskBytes(_ member: Int) -> Int {
        let all = members
        guard all.indices.contains(member) else { return 0 }
        return allocatedBytes(under: all[member].dataDir)
    }
}

/// Base64 of the key's or value's bytes, as the gateway wants them in JSON.
private func etcdBase64(_ text: String) -> String { Data(text.utf8).base64EncodedString() }

/// `/v3/kv/range`'s answer: only what `read` needs. `kvs` is absent for an absent key.
private struct EtcdRangeAnswer: Decodable {
    struct KV: Decodable { let version: EtcdInt64? }
    let kvs: [KV]?
}

/// `/v3/kv/txn`'s answer: `succeeded` is absent (false omitted) when the compare failed.
private struct EtcdTxnAnswer: Decodable {
    let succeeded: Bool?
}

/// `/v3/maintenance/status`'s answer. Member ids are uint64 rendered as strings (beyond Int64): compared as strings.
private struct EtcdStatusAnswer: Decodable {
    struct Header: Decodable { let member_id: String? }
    let header: Header?
    let leader: String?
}

/// An int64 as the gateway writes it (a string), or a plain number should a proxy rewrite it.
private struct EtcdInt64: Decodable {
    let value: Int64
    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if let text = try? container.decode(String.self), let value = Int64(text) {
            self.value = value
        } else {
            value = try container.decode(Int64.self)
        }
    }
}

/// One client's keep-alive HTTP/1.1 connection to one member, plus one more connection per watch (a watch answer
/// never ends, so it cannot share the request connection). Sendable: the connection is, and the watch tasks sit
/// behind a Mutex.
final class EtcdConnection: ComparedConnection {
    private let http: BenchHTTPConnection
    /// `host:port`: where watches connect.
    private let address: String
    private let watches = TaskList()

    private init(http: BenchHTTPConnection, address: String) {
        self.http = http
        self.address = address
    }

    var taskExecutor: any TaskExecutor { http.taskExecutor }

    static func open(host: String, port: Int) async throws -> EtcdConnection {
        EtcdConnection(http: try await BenchHTTPConnection.open(host: host, port: port), address: "\(host):\(port)")
    }

    func put(_ key: String, _ value: [UInt8]) async throws {
        let body = #"{"key":"\#(etcdBase64(key))","value":"\#(Data(value).base64EncodedString())"}"#
        _ = try await post("/v3/kv/put", ByteBuffer(string: body))
    }

    /// A default range: linearizable (`serializable` is false unless asked).
    func read(_ key: String) async throws -> Int64 {
        let answer = try await post("/v3/kv/range", ByteBuffer(string: #"{"key":"\#(etcdBase64(key))"}"#))
        let range = try JSONDecoder().decode(EtcdRangeAnswer.self, from: Data(answer.readableBytesView))
        return range.kvs?.first?.version?.value ?? 0
    }

    /// A txn comparing the key's VERSION (an absent key's is 0, so version 0 creates it) and putting on success.
    func compareAndSet(_ key: String, version: Int64, _ value: [UInt8]) async throws -> Int64? {
        let k = etcdBase64(key)
        let v = Data(value).base64EncodedString()
        let body =
            #"{"compare":[{"key":"\#(k)","result":"EQUAL","target":"VERSION","version":"\#(version)"}],"#
            + #""success":[{"requestPut":{"key":"\#(k)","value":"\#(v)"}}]}"#
        let answer = try await post("/v3/kv/txn", ByteBuffer(string: body))
        let txn = try JSONDecoder().decode(EtcdTxnAnswer.self, from: Data(answer.readableBytesView))
        return txn.succeeded == true ? version + 1 : nil
    }

    /// A `/v3/watch` stream on a connection of its own; returns once etcd confirmed the watch (`created`), so every
    /// later write is seen.
    func watch(_ key: String, changed: @escaping @Sendable () -> Void) async throws {
        let address = self.address
        let body = Array(#"{"create_request":{"key":"\#(etcdBase64(key))"}}"#.utf8)
        let (created, confirm) = AsyncStream<Result<Void, any Error>>.makeStream()
        let task = Task {
            do {
                let (status, errorBody) = try await HTTPExchange.stream("/v3/watch", to: address, method: .POST, body: body) {
                    line in
                    let message = try JSONSerialization.jsonObject(with: Data(line)) as? [String: Any]
                    if let error = message?["error"] {
                        throw ComparedError("etcd watch: \(error)")
                    }
                    guard let result = message?["result"] as? [String: Any] else { return }
                    if result["canceled"] as? Bool == true {
                        throw ComparedError("etcd watch canceled: \(result["cancel_reason"] ?? "no reason given")")
                    }
                    if result["created"] as? Bool == true {
                        confirm.yield(.success(()))
                        confirm.finish()
                    }
                    for _ in 0..<((result["events"] as? [Any])?.count ?? 0) { changed() }
                }
                if status != 200 {
                    throw ComparedError("etcd watch: HTTP \(status) \(String(decoding: errorBody, as: UTF8.self))")
                }
                confirm.yield(.failure(ComparedError("etcd watch: the stream ended before the watch was created")))
            } catch {
                // After `created` the stream is finished and this is dropped: a watch that ends stays silent.
                confirm.yield(.failure(error))
            }
            confirm.finish()
        }
        let timer = Task {
            guard (try? await Task.sleep(for: .seconds(10))) != nil else { return }
            confirm.yield(.failure(ComparedError("etcd watch: not created within 10 s")))
            confirm.finish()
        }
        defer { timer.cancel() }
        var outcome: Result<Void, any Error> = .failure(ComparedError("etcd watch: no answer"))
        for await first in created {
            outcome = first
            break
        }
        do {
            try outcome.get()
        } catch {
            task.cancel()
            throw error
        }
        watches.add(task)
    }

    /// Cancelling a watch task ends its stream, which closes its connection.
    func close() async {
        watches.cancelAll()
        await http.close()
    }

    /// One POST on the kept-alive connection; the answer's body, or a throw for any status but 200.
    private func post(_ uri: String, _ body: ByteBuffer) async throws -> ByteBuffer {
        let answer = try await http.request(.POST, uri, body: body)
        guard answer.status == 200 else {
            throw ComparedError("etcd \(uri): HTTP \(answer.status) \(String(buffer: answer.body))")
        }
        return answer.body
    }
}
