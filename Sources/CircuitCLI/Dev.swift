import ArgumentParser
import CircuitAPI
import CircuitClient
import CircuitNode
import Foundation
import UnixSignals

/// `circuit dev`: a local cluster of real daemons in one command.
struct Dev: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a local cluster of circuit daemons on loopback, show it working, and keep it running until interrupted.")

    @Option(help: "Folder for the nodes' data and logs (default: a new temporary folder).") var data: String?
    @Option(help: "Voters to start.") var nodes: Int = 3
    @Option(help: "First API port (peer ports start 100 higher); 0 picks free ports.") var basePort: Int = 7700
    @Option(help: "Stop after this many seconds (0: run until Ctrl-C).") var seconds: Int = 0

    func run() async throws {
        guard (1...7).contains(nodes) else { throw ValidationError("--nodes must be 1 to 7") }
        let base = data ?? temporaryDirectory("circuit-dev")
        let binary = URL(fileURLWithPath: CommandLine.arguments[0]).standardizedFileURL.path
        var members: [(folder: DataFolder, peer: String, api: String)] = []
        for i in 0..<nodes {
            let folder = try DataFolder(path: "\(base)/node\(i + 1)")
            let api = basePort == 0 ? try freePort() : basePort + i
            let peer = basePort == 0 ? try freePort() : basePort + 100 + i
            members.append((folder, "127.0.0.1:\(peer)", "127.0.0.1:\(api)"))
        }
        let bootstrap = members.map { "\($0.folder.hostID)@\($0.peer)" }.joined(separator: ",")
        var children: [Process] = []
        defer {
            for child in children where child.isRunning { kill(child.processIdentifier, SIGTERM) }
            for child in children { child.waitUntilExit() }
            print("stopped \(children.count) daemons; data left in \(base)")
        }
        print("circuit dev: \(nodes) voters on loopback, data in \(base)")
        for m in members {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: binary)
            process.arguments = [
                "start", "--data", m.folder.path, "--peer-listen", m.peer, "--client-listen", m.api, "--bootstrap", bootstrap,
            ]
            _ = FileManager.default.createFile(atPath: "\(m.folder.path)/daemon.log", contents: nil)
            process.standardError = FileHandle(forWritingAtPath: "\(m.folder.path)/daemon.log")
            process.standardOutput = FileHandle.nullDevice
            try process.run()
            children.append(process)
            print("  \(m.folder.hostID)  api http://\(m.api)  peer \(m.peer)  log \(m.folder.path)/daemon.log")
        }
        let client = CircuitClient(endpoints: members.map(\.api))
        let clock = ContinuousClock()
        let started = clock.now

        // Show it working: a leader, the membership, writes through any node, a linearizable read.
        var leader: String?
        while leader == nil {
            guard started.duration(to: clock.now) < .seconds(30) else { throw ValidationError("no leader after 30 s; see the logs") }
            leader = (try? await client.status())?.leader
            if leader == nil { try await Task.sleep(for: .milliseconds(50)) }
        }
        print("  leader \(leader!) elected after \(fmt(started.duration(to: clock.now)))")
        var hosts: [HostView] = []
        while hosts.filter({ $0.state == "alive" }).count < nodes && started.duration(to: clock.now) < .seconds(30) {
            hosts = (try? await client.members()) ?? []
            try await Task.sleep(for: .milliseconds(50))
        }
        print("  members: \(hosts.map { "\($0.id) (\($0.role), \($0.state))" }.joined(separator: ", "))")
        let writeStart = clock.now
        for i in 0..<100 {
            try await CircuitClient(endpoints: [members[i % nodes].api]).put("/records/dev/k\(i)", Array("value \(i)".utf8))
        }
        print("  100 writes through every node in turn: \(fmt(writeStart.duration(to: clock.now)))")
        let read = try await CircuitClient(endpoints: [members.last!.api]).get("/records/dev/k99")
        print("  linearizable read of /records/dev/k99 from \(members.last!.folder.hostID): \(read.value.debugDescription) (version \(read.version), revision \(read.revision))")
        print("")
        print("Try:  export CIRCUIT=\(members.map(\.api).joined(separator: ","))")
        print("      \(binary) status; \(binary) members; \(binary) put /records/a hello; \(binary) get /records/a")
        print(seconds == 0 ? "Running; Ctrl-C stops every daemon." : "Running for \(seconds) s.")

        let signals = await UnixSignalsSequence(trapping: [.sigint, .sigterm])
        if seconds == 0 {
            for await _ in signals { break }
        } else {
            try await Task.sleep(for: .seconds(seconds))
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
    guard bound else { throw ValidationError("cannot find a free port") }
    return Int(UInt16(bigEndian: address.sin_port))
}
