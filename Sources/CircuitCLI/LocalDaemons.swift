import CircuitClient
import CircuitNode
import Foundation

/// Circuit daemons started as child processes of this one, on loopback: what `circuit dev` and `circuit bench api`
/// run.
final class LocalDaemons {
    struct Member {
        let folder: DataFolder
        let peer: String
        let api: String
        var process: Process?
    }

    let base: String
    let binary: String
    private(set) var members: [Member] = []

    /// Makes `count` data folders under `base` and chooses ports: `basePort + i` for the APIs and
    /// `basePort + 100 + i` for the peers, or free ones if `basePort` is 0.
    init(base: String, count: Int, basePort: Int) throws {
        self.base = base
        self.binary = URL(fileURLWithPath: CommandLine.arguments[0]).standardizedFileURL.path
        for i in 0..<count {
            let folder = try DataFolder(path: "\(base)/node\(i + 1)")
            let api = basePort == 0 ? try freePort() : basePort + i
            let peer = basePort == 0 ? try freePort() : basePort + 100 + i
            members.append(Member(folder: folder, peer: "127.0.0.1:\(peer)", api: "127.0.0.1:\(api)"))
        }
    }

    var bootstrap: String { members.map { "\($0.folder.hostID)@\($0.peer)" }.joined(separator: ",") }
    var apis: [String] { members.map(\.api) }
    func client(_ i: Int) -> CircuitClient { CircuitClient(endpoints: [members[i].api]) }
    var live: CircuitClient { CircuitClient(endpoints: members.filter { $0.process != nil }.map(\.api)) }

    /// Starts member `i`, its log going to `daemon.log` in its folder.
    func start(_ i: Int) throws {
        let m = members[i]
        let process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = ["start", "--data", m.folder.path, "--peer-listen", m.peer, "--client-listen", m.api, "--bootstrap", bootstrap]
        let log = "\(m.folder.path)/daemon.log"
        if !FileManager.default.fileExists(atPath: log) { _ = FileManager.default.createFile(atPath: log, contents: nil) }
        let handle = FileHandle(forWritingAtPath: log)
        handle?.seekToEndOfFile()
        process.standardError = handle
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        members[i].process = process
    }

    func startAll() throws { for i in members.indices { try start(i) } }

    func kill9(_ i: Int) {
        guard let p = members[i].process else { return }
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        members[i].process = nil
    }

    /// SIGTERM to every daemon (each hands leadership over and stops), then waits for them.
    func stopAll() {
        for m in members { if let p = m.process, p.isRunning { kill(p.processIdentifier, SIGTERM) } }
        for i in members.indices {
            members[i].process?.waitUntilExit()
            members[i].process = nil
        }
    }

    /// The member every live daemon names as leader, once they agree.
    func leader(timeout: Duration = .seconds(30)) async throws -> Int {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while clock.now < deadline {
            var named: Set<String> = []
            for (i, m) in members.enumerated() where m.process != nil {
                named.insert((try? await client(i).status())?.leader ?? "?")
            }
            if named.count == 1, let id = named.first, let i = members.firstIndex(where: { $0.folder.hostID == id }),
                members[i].process != nil
            {
                return i
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        throw LocalDaemonsError.noLeader(base)
    }

    /// Waits until every live member is registered and alive.
    func allAlive(timeout: Duration = .seconds(30)) async throws -> [HostViewSummary] {
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        let want = members.filter { $0.process != nil }.count
        while clock.now < deadline {
            if let hosts = try? await live.members(), hosts.filter({ $0.state == "alive" }).count >= want {
                return hosts.map { HostViewSummary(id: $0.id, role: $0.role, state: $0.state) }
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        throw LocalDaemonsError.notAlive(base)
    }

    /// Resident memory of member `i`, from /proc.
    func residentBytes(_ i: Int) -> Int {
        guard let p = members[i].process,
            let status = try? String(contentsOfFile: "/proc/\(p.processIdentifier)/status", encoding: .utf8),
            let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") })
        else { return 0 }
        return (Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0) * 1024
    }
}

struct HostViewSummary {
    var id: String
    var role: String
    var state: String
}

enum LocalDaemonsError: Error, CustomStringConvertible {
    case noLeader(String)
    case notAlive(String)
    var description: String {
        switch self {
        case .noLeader(let base): return "the daemons agreed on no leader within 30 s; see the logs under \(base)"
        case .notAlive(let base): return "not every daemon registered within 30 s; see the logs under \(base)"
        }
    }
}

/// A port the kernel says is free now.
func freePort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = 0
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
    }
    guard bound else { throw LocalDaemonsError.notAlive("(no free port)") }
    return Int(UInt16(bigEndian: address.sin_port))
}
