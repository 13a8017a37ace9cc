import CircuitAPI
import CircuitClient
import Foundation

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
        public fileprivate(set) var process: Process?
    }

    public let base: String
    /// The `circuit` executable.
    public let binary: String
    public let sessionTTLMillis: UInt64?
    /// Passed as `--voter-replace-after-ms` (nil: the daemon's default).
    public var voterReplaceAfterMillis: UInt64?
    public private(set) var members: [Member] = []

    /// Makes `count` data folders under `base` and chooses ports: `basePort + i` for the APIs and
    /// `basePort + 100 + i` for the peers, or ports the kernel hands out if `basePort` is 0.
    public init(binary: String, base: String, count: Int, basePort: Int = 0, sessionTTLMillis: UInt64? = nil) throws {
        self.binary = binary
        self.base = base
        self.sessionTTLMillis = sessionTTLMillis
        for i in 0..<count {
            let api = basePort == 0 ? try freePort() : basePort + i
            let peer = basePort == 0 ? try freePort() : basePort + 100 + i
            members.append(
                Member(
                    folder: try DataFolder(path: "\(base)/node\(i + 1)"), peer: "127.0.0.1:\(peer)", api: "127.0.0.1:\(api)",
                    join: nil, joinAs: "learner"))
        }
    }

    /// A new host that joins through `contact` (any member's API) when started, as a `learner` or a `worker`.
    public func add(join contact: String, as role: String = "learner") throws {
        members.append(
            Member(
                folder: try DataFolder(path: "\(base)/node\(members.count + 1)"), peer: "127.0.0.1:\(try freePort())",
                api: "127.0.0.1:\(try freePort())", join: contact, joinAs: role))
    }

    public var bootstrap: String {
        members.filter { $0.join == nil }.map { "\($0.folder.hostID)@\($0.peer)" }.joined(separator: ",")
    }
    public var apis: [String] { members.map(\.api) }
    public func client(_ i: Int) -> CircuitClient { CircuitClient(endpoints: [members[i].api]) }
    /// A client of every running member.
    public var live: CircuitClient { CircuitClient(endpoints: members.filter { $0.process != nil }.map(\.api)) }

    /// Starts member `i`; its log is appended to `daemon.log` in its folder.
    public func start(_ i: Int) throws {
        let m = members[i]
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        // A joiner runs `circuit join ADDRESS` (the operator's verb; `start --join` is the same), the others
        // `circuit start`.
        process.arguments =
            (m.join.map { ["join", $0] } ?? ["start"]) + ["--data", m.folder.path, "--peer-listen", m.peer, "--client-listen", m.api]
            + (sessionTTLMillis.map { ["--session-ttl-ms", "\($0)"] } ?? [])
            + (voterReplaceAfterMillis.map { ["--voter-replace-after-ms", "\($0)"] } ?? [])
            + (m.join == nil ? ["--bootstrap", bootstrap] : ["--join-as", m.joinAs])
        let log = "\(m.folder.path)/daemon.log"
        if !FileManager.default.fileExists(atPath: log) { _ = FileManager.default.createFile(atPath: log, contents: nil) }
        let handle = FileHandle(forWritingAtPath: log)
        handle?.seekToEndOfFile()
        process.standardError = handle
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        members[i].process = process
    }

    public func startAll() throws { for i in members.indices { try start(i) } }

    public func kill9(_ i: Int) {
        guard let p = members[i].process else { return }
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        members[i].process = nil
    }

    /// Sends `signal` to every running daemon (SIGTERM: each hands leadership over and stops) and waits for them.
    public func stopAll(signal: Int32 = SIGTERM) {
        for m in members { if let p = m.process, p.isRunning { kill(p.processIdentifier, signal) } }
        for i in members.indices {
            members[i].process?.waitUntilExit()
            members[i].process = nil
        }
    }

    /// The member every running daemon names as leader, once they agree.
    public func leader(timeout: Duration = .seconds(30)) async throws -> Int {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while clock.now < deadline {
            var named: Set<String> = []
            for (i, m) in members.enumerated() where m.process != nil {
                var c = client(i)
                c.timeout = 2
                named.insert((try? await c.status())?.leader ?? "?")
            }
            if named.count == 1, let id = named.first, let i = members.firstIndex(where: { $0.folder.hostID == id }),
                members[i].process != nil
            {
                return i
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        throw DaemonProcessesError.noLeader(base, timeout)
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
            try await Task.sleep(for: .milliseconds(20))
        }
        throw DaemonProcessesError.notAlive(base, timeout)
    }

    /// Resident memory of member `i`, from /proc.
    public func residentBytes(_ i: Int) -> Int {
        guard let p = members[i].process,
            let status = try? String(contentsOfFile: "/proc/\(p.processIdentifier)/status", encoding: .utf8),
            let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") })
        else { return 0 }
        return (Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0) * 1024
    }
}

public enum DaemonProcessesError: Error, CustomStringConvertible {
    case noLeader(String, Duration)
    case notAlive(String, Duration)
    case noPort

    public var description: String {
        switch self {
        case .noLeader(let base, let t): return "the daemons agreed on no leader within \(t); see the logs under \(base)"
        case .notAlive(let base, let t): return "not every daemon registered within \(t); see the logs under \(base)"
        case .noPort: return "no free port"
        }
    }
}

/// A loopback port that is free now, below the ephemeral range.
public func freePort() throws -> Int {
    // Below the kernel's ephemeral range (32768 and up here): a port the kernel hands out with bind(0) can be taken
    // by any outgoing connection before the daemon binds it; one of these only by an explicit bind.
    for _ in 0..<200 {
        let port = Int.random(in: 10_000..<32_000)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = UInt16(port).bigEndian
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
        if bound { return port }
    }
    throw DaemonProcessesError.noPort
}
