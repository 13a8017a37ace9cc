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
        let daemons = try DaemonProcesses(binary: binary, base: base, count: nodes, basePort: basePort, portRange: cliPortRange)
        defer {
            daemons.stopAll()
            print("stopped \(nodes) daemons; data left in \(base)")
        }
        print("circuit dev: \(nodes) voters on loopback, data in \(base)")
        try daemons.startAll()
        for m in daemons.members {
            print("  \(m.folder.hostID)  api http://\(m.api)  peer \(m.peer)  log \(m.folder.path)/daemon.log")
        }
        let clock = ContinuousClock()
        let started = clock.now

        // Show it working: a leader, the membership, writes through any node, a linearizable read.
        let leader = try await daemons.leader()
        print("  leader \(daemons.members[leader].folder.hostID) elected after \(fmt(started.duration(to: clock.now)))")
        let hosts = try await daemons.allAlive()
        print("  members: \(hosts.map { "\($0.id) (\($0.role), \($0.state))" }.joined(separator: ", "))")
        let writeStart = clock.now
        for i in 0..<100 {
            try await daemons.client(i % nodes).put("/records/dev/k\(i)", Array("value \(i)".utf8))
        }
        print("  100 writes through every node in turn: \(fmt(writeStart.duration(to: clock.now)))")
        let last = daemons.members.count - 1
        let read = try await daemons.client(last).get("/records/dev/k99")
        print("  linearizable read of /records/dev/k99 from \(daemons.members[last].folder.hostID): \(read.value.debugDescription) (version \(read.version), revision \(read.revision))")
        // A process on each host, named through Raft, run by its host, its exit status back through the log.
        let runStart = clock.now
        var client = daemons.client(leader)
        client.timeout = 30
        for (i, m) in daemons.members.enumerated() {
            _ = try await client.run(
                "/\(m.folder.hostID)/dev/hello", ProcCommandView(path: "/bin/sh", args: ["-c", "exit \(i)"]))
        }
        var codes: [String] = []
        for m in daemons.members {
            let done = try await client.wait("/\(m.folder.hostID)/dev/hello")
            codes.append("\(m.folder.hostID): \(done.phase ?? "?") \(done.exitCode ?? -1)")
        }
        print("  a process on every host, run and waited for in \(fmt(runStart.duration(to: clock.now))): \(codes.joined(separator: ", "))")
        print("")
        print("Try:  export CIRCUIT=\(daemons.apis.joined(separator: ","))")
        print("      \(daemons.binary) status; \(daemons.binary) members; \(daemons.binary) put /records/a hello; \(daemons.binary) get /records/a")
        print("      \(daemons.binary) run /\(daemons.members[0].folder.hostID)/job /bin/sleep 5; \(daemons.binary) wait /\(daemons.members[0].folder.hostID)/job")
        print(seconds == 0 ? "Running; Ctrl-C stops every daemon." : "Running for \(seconds) s.")

        let signals = await UnixSignalsSequence(trapping: [.sigint, .sigterm])
        if seconds == 0 {
            for await _ in signals { break }
        } else {
            try await Task.sleep(for: .seconds(seconds))
        }
    }
}
