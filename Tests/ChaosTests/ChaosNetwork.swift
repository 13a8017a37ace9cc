import CircuitClient
import CircuitNode
import CircuitTestSupport
import Foundation

/// A network of its own for each daemon: a Linux network namespace per member, joined by veth pairs to one bridge in
/// the test's namespace (where the clients run), each member with its own address. A partition is real packet loss:
/// nftables rules in a member's namespace that drop what it sends to, or receives from, the members it is cut from.
/// Needs root, `ip` (iproute2) and `nft` (nftables); `make()` answers nil where they are missing, and the suite then
/// runs on loopback with process faults only, and says so.
final class ChaosNetwork: Partitioner, @unchecked Sendable {
    let count: Int
    /// Names start with this (a bridge, veths and namespaces); unique to this test process.
    let prefix: String
    /// The members' addresses: `10.77.S.1` to `10.77.S.count`; the test's side of the bridge is `10.77.S.254`.
    let addresses: [String]
    var namespaces: [String] { (1...count).map { "\(prefix)n\($0)" } }
    /// Who cannot hear whom now: a pair (from, to) means packets from member `from` to member `to` are dropped.
    private(set) var cut: Set<Pair> = []

    struct Pair: Hashable, Comparable, CustomStringConvertible {
        var from: Int
        var to: Int
        static func < (a: Pair, b: Pair) -> Bool { (a.from, a.to) < (b.from, b.to) }
        var description: String { "\(from)→\(to)" }
    }

    private init(count: Int, prefix: String, subnet: Int) {
        self.count = count
        self.prefix = prefix
        self.addresses = (1...count).map { "10.77.\(subnet).\($0)" }
    }

    /// Builds the network, or answers nil (with why) where this machine cannot.
    static func make(count: Int) -> (ChaosNetwork?, String) {
        guard getuid() == 0 else { return (nil, "not root") }
        for tool in ["/usr/sbin/ip", "/usr/sbin/nft"] where !FileManager.default.isExecutableFile(atPath: tool) {
            return (nil, "\(tool) is missing (apt-get install iproute2 nftables)")
        }
        removeLeftovers()
        let pid = Int(getpid())
        let network = ChaosNetwork(count: count, prefix: "cc\(pid)", subnet: 1 + pid % 250)
        do {
            try network.build()
            return (network, "network namespaces \(network.addresses.first!)…, nftables partitions")
        } catch {
            network.remove()
            return (nil, "could not build network namespaces: \(error)")
        }
    }

    private func build() throws {
        let bridge = "\(prefix)br"
        let subnet = addresses[0].split(separator: ".").dropLast().joined(separator: ".")
        try Self.run("ip", "link", "add", bridge, "type", "bridge")
        try Self.run("ip", "addr", "add", "\(subnet).254/24", "dev", bridge)
        try Self.run("ip", "link", "set", bridge, "up")
        for i in 0..<count {
            let ns = namespaces[i]
            let veth = "\(prefix)v\(i + 1)"
            try Self.run("ip", "netns", "add", ns)
            try Self.run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            try Self.run("ip", "link", "set", veth, "master", bridge, "up")
            try Self.run("ip", "-n", ns, "addr", "add", "\(addresses[i])/24", "dev", "eth0")
            try Self.run("ip", "-n", ns, "link", "set", "eth0", "up")
            try Self.run("ip", "-n", ns, "link", "set", "lo", "up")
            try Self.run(
                "ip", "netns", "exec", ns, "nft",
                "add table inet chaos; add chain inet chaos in { type filter hook input priority 0; policy accept; };"
                    + " add chain inet chaos out { type filter hook output priority 0; policy accept; }")
        }
    }

    /// Sets exactly these cuts (and heals every other): `pairs` (from, to) drop from's packets to `to`. Each side
    /// of a cut is enforced where it leaves and where it arrives, so a cut holds even for packets already queued.
    func set(_ pairs: Set<Pair>) async throws {
        // `nft` runs once per member and is waited for: off the cooperative pool.
        try await onOwnThread { try self.apply(pairs) }
    }

    private func apply(_ pairs: Set<Pair>) throws {
        for i in 0..<count {
            var rules = "flush chain inet chaos in; flush chain inet chaos out;"
            for p in pairs where p.from == i { rules += " add rule inet chaos out ip daddr \(addresses[p.to]) drop;" }
            for p in pairs where p.to == i { rules += " add rule inet chaos in ip saddr \(addresses[p.from]) drop;" }
            try Self.run("ip", "netns", "exec", namespaces[i], "nft", rules)
        }
        cut = pairs
    }

    /// Cuts every member of `a` from every member of `b`, both ways.
    static func between(_ a: [Int], _ b: [Int]) -> Set<Pair> {
        var pairs: Set<Pair> = []
        for x in a { for y in b where x != y { pairs.insert(Pair(from: x, to: y)); pairs.insert(Pair(from: y, to: x)) } }
        return pairs
    }

    /// Removes the namespaces (killing whatever still runs in them) and the bridge.
    func remove() {
        for ns in namespaces { Self.removeNamespace(ns) }
        _ = try? Self.run("ip", "link", "del", "\(prefix)br")
    }

    /// Namespaces and bridges of earlier runs whose test process is gone.
    private static func removeLeftovers() {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: "/run/netns") else { return }
        for name in names where name.hasPrefix("cc") {
            let digits = name.dropFirst(2).prefix { $0.isNumber }
            if let pid = Int(digits), pid != Int(getpid()), kill(pid_t(pid), 0) != 0 {
                removeNamespace(name)
                _ = try? run("ip", "link", "del", "cc\(digits)br")
            }
        }
    }

    /// Kills what still runs in the namespace (deleting it would not), then deletes it.
    private static func removeNamespace(_ name: String) {
        let pids = (try? run("ip", "netns", "pids", name)) ?? ""
        for pid in pids.split(separator: "\n").compactMap({ Int32($0) }) { kill(pid, SIGKILL) }
        _ = try? run("ip", "netns", "del", name)
    }

    struct CommandFailed: Error, CustomStringConvertible {
        var command: [String]
        var status: Int32
        var output: String
        var description: String { "`\(command.joined(separator: " "))` exited \(status): \(output)" }
    }

    @discardableResult
    static func run(_ arguments: String...) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/sbin/\(arguments[0])")
        process.arguments = Array(arguments.dropFirst())
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw CommandFailed(command: arguments, status: process.terminationStatus, output: output)
        }
        return output
    }
}

/// What cuts members off from each other: `set` makes exactly these cuts, healing every other.
protocol Partitioner: Sendable {
    func set(_ pairs: Set<ChaosNetwork.Pair>) async throws
}

extension Partitioner {
    func heal() async throws { try await set([]) }
}

/// The fallback where namespaces cannot be made: each daemon (started with `--test-faults`) drops the Raft frames of
/// its cut peers in its transport (`PUT /v1/debug/cut`). Only Raft traffic is cut (a follower still forwards a
/// client's request to the leader over HTTP), and a daemon restarted meanwhile starts uncut until the next change.
final class TransportCuts: Partitioner, @unchecked Sendable {
    let cluster: DaemonProcesses
    init(cluster: DaemonProcesses) { self.cluster = cluster }

    func set(_ pairs: Set<ChaosNetwork.Pair>) async throws {
        let ids = cluster.members.map(\.folder.hostID)
        for i in ids.indices where cluster.members[i].process != nil {
            var client = cluster.client(i)
            client.timeout = 1
            try? await client.cut(
                to: pairs.filter { $0.from == i }.map { ids[$0.to] }, from: pairs.filter { $0.to == i }.map { ids[$0.from] })
        }
    }
}
