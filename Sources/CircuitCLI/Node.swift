import ArgumentParser
import CircuitAPI
import CircuitClient
import CircuitNode
import CircuitSecurity
import Foundation
import Logging

/// `circuit start`: the daemon.
struct Start: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run this host's circuit daemon.",
        discussion: """
            Settings come from --config (TOML; see config/) and then the flags. A new data folder needs --bootstrap \
            to form a cluster: every voter, as X<host id>@host:port (peer address); `circuit id --data DIR` prints \
            (and on first use chooses) a folder's host id. A folder that belongs to a cluster resumes it.
            """)

    @OptionGroup var global: GlobalOptions
    @OptionGroup var settings: DaemonOptions

    func run() async throws {
        try await settings.runDaemon(global: global)
    }
}

/// `circuit join`: `circuit start --join` in the words of an operator.
struct Join: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run this host's daemon, joining the cluster of the member whose API is at ADDRESS.",
        discussion: """
            The same as `circuit start --join ADDRESS`: the new host joins as a learner (in Raft; `circuit promote` \
            makes it a voter) or, with --join-as worker, as a worker (in the membership only). Once its data folder \
            belongs to the cluster, `circuit start` resumes it.

            With a join token (`circuit token create` on an admin's machine) and --tls-dir DIR, the host needs no \
            certificate beforehand: it checks the cluster's CA against the token, has the cluster issue its \
            certificate, and writes DIR/ca.pem, DIR/<host id>.pem and DIR/<host id>.key (0600). Give the same \
            --tls-dir at every later start.
            """)

    @OptionGroup var global: GlobalOptions
    @Argument(help: "API address (host:port) of any member of the cluster.") var address: String
    @OptionGroup var settings: DaemonOptions

    func run() async throws {
        var settings = settings
        settings.join = address
        try await settings.runDaemon(global: global)
    }
}

/// The daemon's settings as flags (over a TOML file).
struct DaemonOptions: ParsableArguments {
    @Option(help: "A TOML file of settings (flags override it).") var config: String?
    @Option(help: "The data folder.") var data: String?
    @Option(help: "Peer (Raft) listen address, host:port.") var peerListen: String?
    @Option(help: "Peer address other hosts dial (default: --peer-listen).") var peerAdvertise: String?
    @Option(help: "HTTP API listen address, host:port.") var clientListen: String?
    @Option(help: "API address others use (default: --client-listen).") var clientAdvertise: String?
    @Option(help: "Form a new cluster of these voters: X<id>@host:port, comma-separated.") var bootstrap: String?
    @Option(help: "Join the cluster of the member whose API is at host:port.") var join: String?
    @Option(help: "What a joining host becomes: learner (in Raft, can be promoted) or worker (membership only).") var joinAs: String?
    @Option(help: "Milliseconds a voter may be lost before the leader replaces it with a caught-up learner (0: never).")
    var voterReplaceAfterMs: UInt64?
    @Option(help: "Milliseconds a host's session lives without a keep-alive.") var sessionTtlMs: UInt64?
    @Option(help: "Mount the cluster as a file system at this directory while the daemon runs.") var mount: String?
    @Flag(help: "Let other users than the daemon's use the mount (FUSE's allow_other).") var mountAllowOther = false
    @Option(help: "The client certificate the mount acts with (default: the host's own), with --mount-tls-key.") var mountTlsCert: String?
    @Option(help: "The key of --mount-tls-cert.") var mountTlsKey: String?
    @Option(help: "The most sessions one client (a certificate's name, or an address without TLS) may hold.") var maxSessionsPerClient: Int?
    @Option(help: "The most watches and waits one client may have open on this node.") var maxWatchesPerClient: Int?
    @Option(help: "The most requests (streams included) one client may have open on this node.") var maxStreamsPerClient: Int?
    @Option(help: "Mutual TLS: the cluster's CA certificate (with --tls-cert and --tls-key).") var tlsCa: String?
    @Option(help: "Mutual TLS: this host's certificate (`circuit ca issue --host`).") var tlsCert: String?
    @Option(help: "Mutual TLS: this host's key.") var tlsKey: String?
    @Option(help: "Mutual TLS: a folder holding ca.pem, <host id>.pem and <host id>.key instead of the three files (where a join with --token writes them).")
    var tlsDir: String?
    @Option(help: "The CA's key (ca.key): this member then creates join tokens and issues certificates to hosts joining with one.")
    var tlsCaKey: String?
    @Option(help: "A join token (`circuit token create`): a new host gets its certificate from the cluster (with --join and --tls-dir).")
    var token: String?
    @Flag(help: "Allow plaintext on an address other than loopback (anyone who reaches the ports can run processes here).")
    var insecure = false
    @Flag(help: .hidden) var testFaults = false

    func runDaemon(global: GlobalOptions) async throws {
        var settings = try config.map { try NodeConfig(tomlFile: $0) } ?? NodeConfig()
        if let data { settings.data = data }
        if let peerListen { settings.peerListen = peerListen }
        if let peerAdvertise { settings.peerAdvertise = peerAdvertise }
        if let clientListen { settings.clientListen = clientListen }
        if let clientAdvertise { settings.clientAdvertise = clientAdvertise }
        if let bootstrap { settings.bootstrap = bootstrap.split(separator: ",").map(String.init) }
        if let join { settings.join = join }
        if let joinAs { settings.joinAs = joinAs }
        if let voterReplaceAfterMs { settings.voterReplaceAfterMillis = voterReplaceAfterMs }
        if let sessionTtlMs { settings.sessionTTLMillis = sessionTtlMs }
        if let mount { settings.mount = mount }
        if mountAllowOther { settings.mountAllowOther = true }
        if let mountTlsCert { settings.mountTLSCert = mountTlsCert }
        if let mountTlsKey { settings.mountTLSKey = mountTlsKey }
        if let maxSessionsPerClient { settings.maxSessionsPerClient = maxSessionsPerClient }
        if let maxWatchesPerClient { settings.maxWatchesPerClient = maxWatchesPerClient }
        if let maxStreamsPerClient { settings.maxStreamsPerClient = maxStreamsPerClient }
        if let tlsCa { settings.tlsCA = tlsCa }
        if let tlsCert { settings.tlsCert = tlsCert }
        if let tlsKey { settings.tlsKey = tlsKey }
        if let tlsDir { settings.tlsDir = tlsDir }
        if let tlsCaKey { settings.tlsCAKey = tlsCaKey }
        if let token { settings.joinToken = token }
        if insecure { settings.insecure = true }
        if testFaults { settings.testFaults = true }
        var global = global
        if global.logLevel == .warning { global.logLevel = .info }
        let trimming = Allocator.manageDaemonMemory(every: .seconds(5))
        defer { trimming.cancel() }
        try await CircuitDaemon(config: settings, logger: global.makeLogger("circuit")).run()
    }
}

/// `circuit id`: a data folder's host id.
struct ID: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "id", abstract: "Print a data folder's host id, choosing it if the folder is new.")
    @Option(help: "The data folder.") var data: String

    func run() throws { print(try DataFolder(path: data).hostID) }
}

/// How the client verbs find the cluster and print.
struct ClientOptions: ParsableArguments {
    @Option(
        name: .long,
        help: "API address(es) of any node, host:port, comma-separated (default: $CIRCUIT, then the local config, then 127.0.0.1:7700).")
    var node: String?
    @Option(
        name: .customLong("config"),
        help: "A daemon's TOML config: its API address is used (default: $CIRCUIT_CONFIG, then /etc/circuit/circuit.toml if present).")
    var configFile: String?
    @Flag(help: "Print JSON instead of a table.") var json = false
    @OptionGroup var tls: ClientTLSOptions

    /// Loads the TLS identity named (flags, environment, else the local daemon's config) as this process's.
    mutating func validate() throws {
        if let files = try tls.load() {
            ClientTLS.default = files
        } else if let config = localConfig, let files = config.tlsFiles(hostID: Self.hostID(in: config.data)) {
            // On a member's host, its own identity (readable by whoever may read its key).
            ClientTLS.default = try? TLSFiles(ca: files.ca, certificate: files.certificate, key: files.key)
        }
    }

    /// The host id a data folder holds, without creating the folder or choosing one ("" if there is none).
    private static func hostID(in folder: String) -> String {
        ((try? String(contentsOfFile: folder + "/host-id", encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// The node to ask: --node, then $CIRCUIT, then the local daemon's config, then 127.0.0.1:7700.
    var client: CircuitClient {
        let environment = ProcessInfo.processInfo.environment
        let endpoints = node ?? environment["CIRCUIT"] ?? localConfigAddress ?? "127.0.0.1:7700"
        return CircuitClient(endpoints: endpoints.split(separator: ",").map(String.init))
    }

    /// The API address in the local config, if one is named or present. (A file that cannot be read is ignored
    /// here only when it was not named.)
    private var localConfigAddress: String? { localConfig?.advertisedClient }

    private var localConfig: NodeConfig? {
        let named = configFile ?? ProcessInfo.processInfo.environment["CIRCUIT_CONFIG"]
        let path = named ?? "/etc/circuit/circuit.toml"
        guard named != nil || FileManager.default.fileExists(atPath: path) else { return nil }
        return try? NodeConfig(tomlFile: path)
    }

    /// `value` as indented JSON with sorted keys, on standard output.
    static func printJSON(_ value: some Encodable) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        print(String(decoding: try encoder.encode(value), as: UTF8.self))
    }

    /// A create's answer: its JSON, or the line saying what was created where.
    func emitCreated(_ w: WriteView, _ path: String) throws {
        try emit(w) { "\(w.path ?? path) created at revision \(w.revision)" }
    }

    func emit<T: Encodable>(_ value: T, human: () -> String) throws {
        if json {
            try Self.printJSON(value)
        } else {
            print(human())
        }
    }
}

struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show a node's role, term, leader, indexes and the voters.")
    @OptionGroup var options: ClientOptions

    func run() async throws {
        let s = try await options.client.status()
        try options.emit(s) {
            """
            host      \(s.host)
            cluster   \(s.cluster)
            role      \(s.role) (term \(s.term))
            leader    \(s.leader ?? "none known")
            commit    \(s.commitIndex), applied \(s.appliedIndex), revision \(s.revision)
            voters    \(s.voters.joined(separator: " "))
            security  \(s.security ?? "unknown")
            """ + (s.learners.isEmpty ? "" : "\nlearners  \(s.learners.joined(separator: " "))")
        }
    }
}

struct Members: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List the hosts of the membership (linearizable).")
    @OptionGroup var options: ClientOptions
    @Flag(help: "Allow a stale answer from the node asked.") var stale = false

    func run() async throws {
        let hosts = try await options.client.members(stale: stale)
        try options.emit(hosts) {
            (["HOST               ROLE     STATE    PEER                  API"]
                + hosts.map {
                    "\($0.id)  \(pad($0.role, 7))  \(pad($0.state, 7))  \(pad($0.peerAddress, 20))  \($0.clientAddress)"
                }).joined(separator: "\n")
        }
    }
}

struct Ls: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the names under a path; PATH/... lists every element below it.")
    @OptionGroup var options: ClientOptions
    @Flag(name: .short, help: "Long listing (with each record's version).") var long = false
    @Argument(help: "A path, such as / or /records/app or /records/app/...") var path: String = "/"

    func run() async throws {
        let recursive = path.hasSuffix("/...")
        let base = recursive ? String(path.dropLast(4)) : path
        let listing = try await options.client.list(base.isEmpty ? "/" : base, recursive: recursive)
        if long && !options.json {
            for name in listing.names {
                let full = recursive ? name : (base == "/" ? "/" + name : base + "/" + name)
                if full.hasPrefix("/records/"), let r = try? await options.client.get(full) {
                    print("\(full)  v\(r.version)  \(r.value.count)B")
                } else {
                    print(full)
                }
            }
            return
        }
        try options.emit(listing) { listing.names.joined(separator: "\n") }
    }
}

struct Get: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print a record's value (linearizable unless --stale).")
    @OptionGroup var options: ClientOptions
    @Flag(help: "Allow a stale answer from the node asked.") var stale = false
    @Argument(help: "The record, under /records.") var path: String

    func run() async throws {
        let r = try await options.client.get(path, stale: stale)
        try options.emit(r) { r.value }
    }
}

struct Put: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Set a record.")
    @OptionGroup var options: ClientOptions
    @Option(help: "Tie the record to this session (ephemeral).") var session: UInt64 = 0
    @Argument(help: "The record, under /records.") var path: String
    @Argument(help: "The value.") var value: String

    func run() async throws {
        let w = try await options.client.put(path, Array(value.utf8), session: session)
        try options.emit(w) { "\(w.path ?? path) version \(w.version) at revision \(w.revision)" }
    }
}

struct Cas: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Set a record only if it is at a version (0: only if it does not exist).")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The record, under /records.") var path: String
    @Argument(help: "The version it must be at.") var version: UInt64
    @Argument(help: "The new value.") var value: String

    func run() async throws {
        let w = try await options.client.put(path, Array(value.utf8), version: version)
        try options.emit(w) { "\(w.path ?? path) version \(w.version) at revision \(w.revision)" }
    }
}

struct Del: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Delete a record (only at a version, with --version).")
    @OptionGroup var options: ClientOptions
    @Option(help: "Delete only if the record is at this version.") var version: UInt64?
    @Argument(help: "The record, under /records.") var path: String

    func run() async throws {
        let w = try await options.client.delete(path, version: version)
        try options.emit(w) { "deleted at revision \(w.revision)" }
    }
}

struct Mkseq: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a record named PREFIX followed by its parent's next sequence number; prints the name.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The prefix, such as /records/queue/job-") var prefix: String
    @Argument(help: "The value.") var value: String = ""

    func run() async throws {
        let w = try await options.client.createSequential(prefix, Array(value.utf8))
        try options.emit(w) { w.path ?? "" }
    }
}

struct Promote: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Make a learner a voter (refused while it lags the leader).")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The host id.") var host: String

    func run() async throws {
        let hosts = try await options.client.promote(host)
        try options.emit(hosts) { "\(host) is a voter" }
    }
}

struct Leave: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove a host from the cluster: out of the membership (its elements go) and out of Raft.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The host id.") var host: String

    func run() async throws {
        let hosts = try await options.client.remove(host)
        try options.emit(hosts) { "\(host) has left" }
    }
}

struct TransferLeader: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "transfer-leader", abstract: "Hand leadership to a voter (default: the most up-to-date one).")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The host id.") var host: String?

    func run() async throws {
        let target = try await options.client.transferLeader(to: host)
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(5)
        while clock.now < deadline {
            if let s = try? await options.client.status(), s.leader == target {
                try options.emit(["leader": target]) { "\(target) leads" }
                return
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        throw ValidationError("the transfer to \(target) did not complete within 5 s")
    }
}

struct Watch: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print every change under a path, from a revision on (default: from now), until interrupted.")
    @OptionGroup var options: ClientOptions
    @Option(help: "The first revision to show.") var from: UInt64?
    @Option(help: "Stop after this many changes (0: never).") var count: Int = 0
    @Argument(help: "A path, such as /records/app or / for everything.") var path: String = "/"

    func run() async throws {
        var seen = 0
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        for try await event in options.client.watch(path, from: from) {
            let line = options.json
                ? String(decoding: try encoder.encode(event), as: UTF8.self)
                : "\(event.revision)  \(pad(event.kind, 11))  \(event.path)" + (event.value.map { "  \($0.debugDescription)" } ?? "")
            // Unbuffered: a watcher's output is read as it comes.
            FileHandle.standardOutput.write(Data((line + "\n").utf8))
            seen += 1
            if count > 0 && seen >= count { return }
        }
    }
}

struct Peek: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show what the anchor at a path holds (as JSON).")
    @OptionGroup var options: ClientOptions
    @Flag(help: "Allow a stale answer from the node asked.") var stale = false
    @Argument(help: "A path, such as /X0123456789abcdef/jobs/a or /records/app/config") var path: String

    func run() async throws {
        let view = try await options.client.peek(path, stale: stale)
        try ClientOptions.printJSON(view)
    }
}

/// `circuit run`: a process element; its host starts it.
struct Run: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a process: PATH /X<host>/name runs it on that host; PATH /jobs/name lets the leader place it, and place it again if its host is lost.")
    @OptionGroup var options: ClientOptions
    @Option(help: "Working directory on the host.") var dir: String?
    @Option(help: "An environment variable, NAME=VALUE (repeatable; none given: the daemon's environment).") var env: [String] = []
    @Option(help: "A job (PATH under /jobs): how many hosts it may be placed on, one after another (default 3).") var attempts: UInt32?
    @Argument(help: "Where: /X<host id>/name") var path: String
    @Argument(parsing: .captureForPassthrough, help: "The program (an absolute path) and its arguments.") var command: [String]

    func validate() throws {
        guard let program = command.first, program.hasPrefix("/") else {
            throw ValidationError("give the program as an absolute path, after the element's path")
        }
    }

    func run() async throws {
        let w = try await options.client.run(
            path, ProcCommandView(path: command[0], args: Array(command.dropFirst()), env: env, dir: dir ?? ""), maxAttempts: attempts)
        try options.emitCreated(w, path)
    }
}

/// `circuit wait`: blocks until a process ends; exit status 1 unless it exited 0.
struct Wait: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Wait until a process ends and print its final state (JSON); exit status 1 unless it exited with 0.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The process: /X<host id>/name") var path: String

    func run() async throws {
        var client = options.client
        client.timeout = 7 * 24 * 3600
        let view = try await client.wait(path)
        try ClientOptions.printJSON(view)
        if view.phase != "exited" || view.exitCode != 0 { Foundation.exit(1) }
    }
}

/// `circuit signal`: a signal to a running process, through its host.
struct Signal: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Send a signal (TERM, KILL, INT, HUP, ... or a number) to a running process.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The process: /X<host id>/name") var path: String
    @Argument(help: "The signal.") var signal: String = "TERM"

    func run() async throws {
        let view = try await options.client.signal(path, signal)
        try options.emit(view) { "sent \(signal) to \(path) (pid \(view.pid ?? 0))" }
    }
}
