import CircuitAPI
import CircuitClient
import CircuitSecurity
import Foundation
import Synchronization

/// Circuit daemons run as child processes on loopback, each with its own data folder: what `circuit dev`,
/// `circuit bench api` and the multi-process tests run.
public final class DaemonProcesses: @unchecked Sendable {
    public struct Member: Sendable {
        public let folder: DataFolder
        public let peer: String
        public let api: String
        /// Join through this API instead of bootstrapping.
        public let join: String?
        /// `learner` or `worker`, for a member that joins.
        public let joinAs: String
        /// A joiner that gets its certificate with this join token (into `tokenTLSFolder`) instead of one issued
        /// beforehand.
        public fileprivate(set) var token: String?
        public fileprivate(set) var process: Process?

        /// Where a joiner with a token has its TLS files written (`--tls-dir`).
        public var tokenTLSFolder: String { folder.path + "/tls" }
    }

    public let base: String
    /// The `circuit` executable.
    public let binary: String
    public let sessionTTLMillis: UInt64?
    /// Passed as `--voter-replace-after-ms` (nil: the daemon's default).
    public var voterReplaceAfterMillis: UInt64?
    /// Members that mount the cluster as a file system while they run (`--mount DIR`), by index.
    public var mounts: [Int: String] = [:]
    /// Members that run in a network namespace of their own (`ip netns exec NAME circuit ...`, the same process), by
    /// index: the chaos tests' partitions.
    public var namespaces: [Int: String] = [:]
    /// Start every daemon with `--test-faults` (`PUT /v1/debug/cut` allowed).
    public var testFaults = false
    /// More arguments for every daemon (`--max-watches-per-client 2`).
    public var extraArguments: [String] = []
    /// With `enableTLS()`: the admin client identity this object's clients use (the daemons speak mutual TLS with
    /// certificates of a CA under `base/tls`). nil: plaintext (with `--insecure` for an address beyond loopback).
    public private(set) var tls: TLSFiles?
    /// The folder of the CA `enableTLS()` made.
    public var tlsFolder: String { base + "/tls" }
    /// The members, as they are now (a copy: safe to read while a nemesis restarts or replaces them).
    public var members: [Member] { table.withLock { $0 } }
    private let table = Mutex<[Member]>([])

    /// Free ports are chosen from this range.
    public let portRange: Range<Int>

    /// Makes `count` data folders under `base` and chooses ports: `basePort + i` for the APIs and
    /// `basePort + 100 + i` for the peers, or free ports from `portRange` if `basePort` is 0. Tests use the default
    /// range, the CLI's own clusters (`circuit dev`, benches) `cliPortRange`: a cluster a test starts through the CLI
    /// cannot pick a port the test process picked at the same moment. Member `i` listens on `addresses[i]`
    /// (loopback if none is given).
    public init(
        binary: String, base: String, count: Int, basePort: Int = 0, portRange: Range<Int> = testPortRange,
        sessionTTLMillis: UInt64? = nil, addresses: [String] = []
    ) throws {
        self.binary = binary
        self.base = base
        self.portRange = portRange
        self.sessionTTLMillis = sessionTTLMillis
        for i in 0..<count {
            let api = basePort == 0 ? try freePort(in: portRange) : basePort + i
            let peer = basePort == 0 ? try freePort(in: portRange) : basePort + 100 + i
            let address = i < addresses.count ? addresses[i] : "127.0.0.1"
            let member = Member(
                folder: try DataFolder(path: "\(base)/node\(i + 1)"), peer: "\(address):\(peer)", api: "\(address):\(api)",
                join: nil, joinAs: "learner")
            table.withLock { $0.append(member) }
        }
    }

    /// A new host that joins through `contact` (any member's API) when started, as a `learner` or a `worker`. With
    /// `token` (and TLS), it is issued no certificate beforehand: it joins with the token (`--token`, `--tls-dir`).
    public func add(join contact: String, as role: String = "learner", token: String? = nil) throws {
        let member = Member(
            folder: try DataFolder(path: "\(base)/node\(members.count + 1)"), peer: "127.0.0.1:\(try freePort(in: portRange))",
            api: "127.0.0.1:\(try freePort(in: portRange))", join: contact, joinAs: role, token: token)
        table.withLock { $0.append(member) }
    }

    /// Member `i` becomes a new host: stopped (kill -9), then a fresh data folder (a new host id) at the same
    /// addresses, that joins through `contact` as `role` when started. A machine re-imaged and added again.
    public func replace(_ i: Int, join contact: String, as role: String = "learner") throws {
        kill9(i)
        let old = members[i]
        let member = Member(
            folder: try DataFolder(path: "\(base)/node\(i + 1)-\(UUID().uuidString.prefix(8))"), peer: old.peer, api: old.api,
            join: contact, joinAs: role)
        table.withLock { $0[i] = member }
    }

    public var bootstrap: String {
        members.filter { $0.join == nil }.map { "\($0.folder.hostID)@\($0.peer)" }.joined(separator: ",")
    }
    public var apis: [String] { members.map(\.api) }
    public func client(_ i: Int) -> CircuitClient { CircuitClient(endpoints: [members[i].api], tls: tls) }
    /// A client of every running member.
    public var live: CircuitClient { CircuitClient(endpoints: members.filter { $0.process != nil }.map(\.api), tls: tls) }

    /// From now on the daemons started speak mutual TLS: a new CA under `base/tls`, a host certificate for each
    /// member when it starts (but a joiner with a token), and an admin certificate (`tester`) for this object's
    /// clients. The bootstrap members hold the CA's key (`--tls-ca-key`): they create join tokens and issue
    /// certificates to the hosts that join with one.
    public func enableTLS() throws {
        let ca = try CertificateAuthority.create()
        try ca.write(to: tlsFolder)
        _ = try ca.issue(name: "tester", roles: [.admin]).write(directory: tlsFolder, name: "tester")
        tls = try TLSFiles(directory: tlsFolder, name: "tester")
    }

    /// A client certificate of this cluster's CA named `name` with `roles`.
    public func issueClient(_ name: String, roles: Set<AccessRole>) throws -> TLSFiles {
        _ = try CertificateAuthority.load(directory: tlsFolder).issue(name: name, roles: roles).write(directory: tlsFolder, name: name)
        return try TLSFiles(directory: tlsFolder, name: name)
    }

    /// Member `i`'s security flags: its certificate (issued now if it has none) with TLS, else `--insecure` for an
    /// address beyond loopback. A joiner with a token gets `--token` and `--tls-dir` instead (its restarts find the
    /// files there); a bootstrap member also gets the CA's key.
    private func securityArguments(_ m: Member) throws -> [String] {
        guard tls != nil else {
            let hosts = [m.peer, m.api].map { (try? NodeConfig.address($0, "address").host) ?? "" }
            return hosts.allSatisfy(NodeConfig.isLoopback) ? [] : ["--insecure"]
        }
        if let token = m.token { return ["--token", token, "--tls-dir", m.tokenTLSFolder] }
        let id = m.folder.hostID
        let caKey = m.join == nil ? ["--tls-ca-key", "\(tlsFolder)/\(CertificateAuthority.keyFile)"] : []
        if !FileManager.default.fileExists(atPath: "\(tlsFolder)/\(id).pem") {
            _ = try CertificateAuthority.load(directory: tlsFolder).issue(name: id, roles: [.host]).write(directory: tlsFolder, name: id)
        }
        return ["--tls-ca", "\(tlsFolder)/ca.pem", "--tls-cert", "\(tlsFolder)/\(id).pem", "--tls-key", "\(tlsFolder)/\(id).key"] + caKey
    }

    /// Starts member `i`; its log is appended to `daemon.log` in its folder.
    public func start(_ i: Int) throws {
        let m = members[i]
        let process = Process()
        // `ip netns exec` enters the namespace and execs the daemon: the process is the daemon itself.
        process.executableURL = URL(fileURLWithPath: namespaces[i] == nil ? binary : "/usr/sbin/ip")
        // A joiner runs `circuit join ADDRESS` (the operator's verb; `start --join` is the same), the others
        // `circuit start`.
        process.arguments =
            (namespaces[i].map { ["netns", "exec", $0, binary] } ?? [])
            + (m.join.map { ["join", $0] } ?? ["start"]) + ["--data", m.folder.path, "--peer-listen", m.peer, "--client-listen", m.api]
            + (sessionTTLMillis.map { ["--session-ttl-ms", "\($0)"] } ?? [])
            + (voterReplaceAfterMillis.map { ["--voter-replace-after-ms", "\($0)"] } ?? [])
            + (mounts[i].map { ["--mount", $0] } ?? [])
            + (testFaults ? ["--test-faults"] : []) + extraArguments
            + (try securityArguments(m))
            + (m.join == nil ? ["--bootstrap", bootstrap] : ["--join-as", m.joinAs])
        let log = "\(m.folder.path)/daemon.log"
        if !FileManager.default.fileExists(atPath: log) { _ = FileManager.default.createFile(atPath: log, contents: nil) }
        let handle = FileHandle(forWritingAtPath: log)
        handle?.seekToEndOfFile()
        process.standardError = handle
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        table.withLock { $0[i].process = process }
    }

    public func startAll() throws { for i in members.indices { try start(i) } }

    public func kill9(_ i: Int) {
        guard let p = members[i].process else { return }
        // Not a process already ended and reaped: its pid may be another's by now.
        if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        _ = Self.waitForExit(p, timeout: .seconds(10))
        table.withLock { $0[i].process = nil }
    }

    /// Sends `signal` to every running daemon (SIGTERM: each hands leadership over and stops) and waits for them; one
    /// still running after 15 s is killed.
    public func stopAll(signal: Int32 = SIGTERM) {
        for m in members { if let p = m.process, p.isRunning { kill(p.processIdentifier, signal) } }
        for i in members.indices {
            if let p = members[i].process, !Self.waitForExit(p, timeout: .seconds(15)) {
                kill(p.processIdentifier, SIGKILL)
                _ = Self.waitForExit(p, timeout: .seconds(10))
            }
            table.withLock { $0[i].process = nil }
        }
    }

    /// Waits until `process` has ended (a zombie not yet reaped counts as ended once its last thread has left: until
    /// then its files, the data folder's lock among them, are still open), at most `timeout`; whether it did. Not
    /// `Process.waitUntilExit()`: on Linux it spins a run loop until Foundation's own reaper notices, and once (a
    /// daemon killed inside a network namespace) it never did, holding a thread of the cooperative pool at 100% for
    /// good.
    public static func waitForExit(_ process: Process, timeout: Duration) -> Bool {
        let deadline = ContinuousClock.now + timeout
        let pid = process.processIdentifier
        while ContinuousClock.now < deadline {
            if !process.isRunning || ProcessIdentity.hasEnded(pid) { return true }
            usleep(2_000)
        }
        return false
    }

    /// The member every running daemon names as leader, once they agree. Fails at once if a daemon has exited, and
    /// at the deadline with what each daemon said and the end of its log.
    public func leader(timeout: Duration = .seconds(30)) async throws -> Int {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        var said: [Int: String] = [:]
        // How often every member was asked, and the longest a call took: a process whose awaits are starved (its
        // cooperative pool's threads blocked elsewhere) asks once, and its calls take far longer than their 2 s.
        var rounds = 0
        var slowest = Duration.zero
        while clock.now < deadline {
            try checkRunning()
            said = [:]
            rounds += 1
            for (i, m) in members.enumerated() where m.process != nil {
                var c = client(i)
                c.timeout = 2
                let asked = clock.now
                do { said[i] = try await c.status().leader ?? "none" } catch { said[i] = "\(error)" }
                slowest = max(slowest, clock.now - asked)
            }
            let named = Set(said.values)
            if named.count == 1, let id = named.first, let i = members.firstIndex(where: { $0.folder.hostID == id }),
                members[i].process != nil
            {
                return i
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        let report = said.keys.sorted().map { "member \($0) names \(said[$0] ?? "?")" }.joined(separator: "; ")
            + "\nasked \(rounds) times; the slowest call took \(slowest)"
        throw DaemonProcessesError.noLeader(base, timeout, report + "\n" + diagnostics() + "\n" + logTails())
    }

    /// For a report of members that cannot be reached: each one's pid, whether it runs, its network namespace beside
    /// this process's, and whether its API port is listening as this process sees it (/proc/net/tcp).
    public func diagnostics() -> String {
        func namespace(_ pid: String) -> String {
            (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/ns/net")) ?? "?"
        }
        // Read to its end: /proc files claim a size of 0, and a large table comes in many reads.
        let table = String(decoding: FileHandle(forReadingAtPath: "/proc/net/tcp")?.readDataToEndOfFile() ?? Data(), as: UTF8.self)
        // Each line: "sl local_address rem_address st ...", the address as hex IP:PORT; state 0A is LISTEN.
        let listening = Set(table.split(separator: "\n").dropFirst().compactMap { line -> Int? in
            let fields = line.split(separator: " ")
            guard fields.count > 3, fields[3] == "0A", let port = fields[1].split(separator: ":").last else { return nil }
            return Int(port, radix: 16)
        })
        let own = namespace("self")
        return members.enumerated().map { i, m in
            guard let p = m.process else { return "member \(i): not running" }
            let port = m.api.split(separator: ":").last.flatMap { Int($0) } ?? 0
            return "member \(i): pid \(p.processIdentifier), running \(p.isRunning), network namespace "
                + "\(namespace(String(p.processIdentifier))) (this process's \(own)), API port \(port) "
                + (listening.contains(port) ? "listening" : "not listening") + " as seen from here"
        }.joined(separator: "\n")
    }

    /// Throws if a daemon started by this object has exited on its own.
    public func checkRunning() throws {
        for (i, m) in members.enumerated() {
            if let p = m.process, !p.isRunning {
                throw DaemonProcessesError.exited(i, p.terminationStatus, logTail(i))
            }
        }
    }

    /// The last lines of member `i`'s log.
    public func logTail(_ i: Int, lines: Int = 12) -> String {
        let text = (try? String(contentsOfFile: "\(members[i].folder.path)/daemon.log", encoding: .utf8)) ?? ""
        return text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
    }

    private func logTails() -> String {
        members.indices.map { "--- member \($0) (\(members[$0].folder.hostID)):\n\(logTail($0))" }.joined(separator: "\n")
    }

    /// Waits until every running member is registered and alive; answers the membership.
    public func allAlive(timeout: Duration = .seconds(30)) async throws -> [HostView] {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        let running = Set(members.filter { $0.process != nil }.map(\.folder.hostID))
        while clock.now < deadline {
            if let hosts = try? await live.members(),
                running.isSubset(of: Set(hosts.filter { $0.state == "alive" }.map(\.id)))
            {
                return hosts
            }
            try checkRunning()
            try await Task.sleep(for: .milliseconds(20))
        }
        throw DaemonProcessesError.notAlive(base, timeout, logTails())
    }

    /// Resident memory of member `i`, from /proc.
    public func residentBytes(_ i: Int) -> Int {
        members[i].process.map { CircuitNode.residentBytes(of: $0.processIdentifier) } ?? 0
    }
}

/// Resident memory of process `pid` (VmRSS, from /proc), 0 if it cannot be read.
public func residentBytes(of pid: Int32) -> Int {
    guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
        let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") })
    else { return 0 }
    return (Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0) * 1024
}

public enum DaemonProcessesError: Error, CustomStringConvertible {
    case noLeader(String, Duration, String)
    case notAlive(String, Duration, String)
    case exited(Int, Int32, String)
    case noPort

    public var description: String {
        switch self {
        case .noLeader(let base, let t, let report):
            return "the daemons agreed on no leader within \(t); logs under \(base): \(report)"
        case .notAlive(let base, let t, let tails):
            return "not every daemon registered within \(t); logs under \(base):\n\(tails)"
        case .exited(let i, let status, let tail): return "daemon \(i) exited with status \(status); its log ends:\n\(tail)"
        case .noPort: return "no free port"
        }
    }
}

/// Ports this process has handed out: two daemons started by one test process never get the same port, even when
/// neither has bound it yet.
private let portsHandedOut = Mutex<Set<Int>>([])

/// Where processes that hand out ports claim them from each other: a file per port, locked (flock) by the process
/// that handed it out for as long as it runs. Two processes choosing at once (a test's `circuit dev` beside its
/// `circuit bench compare`) both found a port free, and the second daemon to bind it failed.
public let portClaims = "/tmp/circuit-port-claims"

/// Claims `port` for this process until it ends; whether no other process holds it.
private func claim(_ port: Int) -> Bool {
    // Any user's processes claim here (the umask would narrow mkdir's mode); a claim needs only a file to read.
    if mkdir(portClaims, 0o1777) == 0 { chmod(portClaims, 0o1777) }
    let fd = open("\(portClaims)/\(port)", O_CREAT | O_RDONLY | O_CLOEXEC, 0o644)
    guard fd >= 0 else { return true }  // No claims here (a read-only /tmp): this process's own set still holds.
    if flock(fd, LOCK_EX | LOCK_NB) == 0 { return true }  // Kept open: the claim lasts as long as this process.
    close(fd)
    return false
}

/// Ports for the daemons tests start; below the kernel's ephemeral range (32768 and up here): a port the kernel hands
/// out with bind(0) can be taken by any outgoing connection before the daemon binds it, one of these only by an
/// explicit bind.
public let testPortRange = 10_000..<22_000
/// Ports for the clusters the CLI starts itself.
public let cliPortRange = 22_000..<32_000

/// A loopback port that is free now, that this process has not handed out before and that no other process running
/// now has.
public func freePort(in range: Range<Int> = testPortRange) throws -> Int {
    for _ in 0..<200 {
        let port = Int.random(in: range)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = UInt16(port).bigEndian
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
        if bound, portsHandedOut.withLock({ $0.insert(port).inserted }), claim(port) { return port }
    }
    throw DaemonProcessesError.noPort
}
