import ArgumentParser
import CircuitRaft
import Foundation
import Synchronization

/// `circuit bench compare`: Circuit beside etcd and ZooKeeper, three members each on loopback, driven by one load
/// generator (this code, for all three) in one run. Every row is measured system after system within each round, so
/// the machine's noise falls on all three alike.
struct CompareBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "compare",
        abstract: "Circuit beside etcd and ZooKeeper in one run: writes, linearizable reads, compare-and-set, watch latency, failover, RSS, disk.")

    @Option(help: "Systems, comma-separated, from circuit, etcd, zookeeper, and circuit-http (Circuit through its HTTP API instead of the binary protocol, as a figure beside it, not a competitor).")
    var systems: String = "circuit,etcd,zookeeper"
    @Option(help: "Concurrent clients, comma-separated; each has its own connection, spread over the 3 members.")
    var clients: String = "1,16,64"
    @Option(help: "Seconds measured per run (after a one-second warm-up).") var seconds: Double = 5
    @Option(help: "Rounds per row; the table shows the median and the spread.") var rounds: Int = 3
    @Option(help: "Leader kills per system for the failover figure.") var failovers: Int = 5
    @Option(help: "Keys pre-created and chosen uniformly.") var keys: Int = 10_000
    @Option(help: "New keys created by 16 clients before the disk is measured.") var inserts: Int = 100_000
    @Option(name: .customLong("watch-samples"), help: "Writes timed to a watcher on another member.") var watchSamples: Int = 200
    @Option(help: "Folder the table is written to, as Markdown and JSON.") var results: String = "bench/results"
    @Option(help: "Folder for the members' data (default: a temporary folder, removed afterwards).") var data: String?
    @Flag(name: .customLong("no-install"), help: "Do not apt-get install etcd-server or zookeeper when missing.") var noInstall = false

    func run() async throws {
        let counts = clients.split(separator: ",").compactMap { Int($0) }
        guard !counts.isEmpty, counts.allSatisfy({ $0 > 0 }) else { throw ValidationError("--clients: positive numbers") }
        guard rounds > 0, seconds > 0, keys >= counts.max()!, watchSamples > 0 else {
            throw ValidationError("--rounds, --seconds and --watch-samples must be positive; --keys at least the most clients")
        }
        let names = systems.split(separator: ",").map { $0.lowercased() }
        guard !names.isEmpty, names.allSatisfy({ ["circuit", "circuit-http", "etcd", "zookeeper"].contains($0) }) else {
            throw ValidationError("--systems: circuit, circuit-http, etcd, zookeeper")
        }
        if !noInstall { try installMissing(names) }
        let base = data ?? temporaryDirectory("circuit-bench-compare")
        defer { if data == nil { try? FileManager.default.removeItem(atPath: base) } }
        let binary = URL(fileURLWithPath: CommandLine.arguments[0]).standardizedFileURL.path
        var compared: [any ComparedSystem] = []
        for name in names {
            switch name {
            case "circuit": compared.append(try CircuitSystem(binary: binary, base: base))
            case "circuit-http": compared.append(try CircuitSystem(binary: binary, base: base, http: true))
            case "etcd": compared.append(EtcdSystem(base: "\(base)/etcd"))
            default: compared.append(ZooKeeperSystem(base: "\(base)/zookeeper"))
            }
        }
        defer { for s in compared { s.stop() } }
        for s in compared {
            note("starting \(s.version)")
            try await s.start()
            try await createKeys(s)
        }

        var table = ComparisonTable(systems: compared.map(\.name))
        for n in counts {
            for op in Operation.allCases {
                var runs: [String: [LoadRun]] = [:]
                for round in 0..<rounds {
                    for s in compared {
                        note("\(op.rawValue), \(n) client\(n == 1 ? "" : "s"), round \(round + 1): \(s.name)")
                        runs[s.name, default: []].append(try await load(s, op, clients: n))
                    }
                }
                let plural = "\(n) client\(n == 1 ? "" : "s")"
                table.add("\(op.rawValue)/s, \(plural)", unit: "ops/s", better: .higher, runs.mapValues { $0.map(\.throughput) })
                if op == .writes {
                    table.add("write latency p50, \(plural)", unit: "ms", better: .lower, runs.mapValues { $0.map(\.p50) })
                    table.add("write latency p99, \(plural)", unit: "ms", better: .lower, runs.mapValues { $0.map(\.p99) })
                }
                let mismatches = runs.values.joined().reduce(0) { $0 + $1.mismatches }
                if mismatches > 0 { note("warning: \(mismatches) compare-and-sets of a client's own key found another version") }
            }
        }
        var watchLatency: [String: [Double]] = [:]
        for s in compared {
            note("watch latency: \(s.name)")
            watchLatency[s.name] = try await watchDelivery(s)
        }
        table.add("watch delivery, write issued to watcher notified on another member, p50", unit: "ms", better: .lower, watchLatency.mapValues { [percentile($0, 0.5)] })
        table.add("watch delivery, p99", unit: "ms", better: .lower, watchLatency.mapValues { [percentile($0, 0.99)] })
        table.add(
            "RSS per member after the load (largest)", unit: "MB", better: .lower,
            Dictionary(uniqueKeysWithValues: compared.map { s in (s.name, (0..<3).map { Double(s.residentBytes($0)) / 1e6 }) }),
            summary: .largest)

        var insertRates: [String: [Double]] = [:]
        for s in compared {
            note("\(inserts) new keys: \(s.name)")
            insertRates[s.name] = [try await insertMany(s)]
        }
        table.add("\(inserts) new keys by 16 clients", unit: "creates/s", better: .higher, insertRates)
        table.add(
            "disk per member after them (largest)", unit: "MB", better: .lower,
            Dictionary(uniqueKeysWithValues: compared.map { s in (s.name, (0..<3).map { Double(s.diskBytes($0)) / 1e6 }) }),
            summary: .largest)

        var failoverTimes: [String: [Double]] = [:]
        for round in 0..<failovers {
            for s in compared {
                note("failover \(round + 1): \(s.name)")
                failoverTimes[s.name, default: []].append(try await failover(s, round: round))
            }
        }
        if failovers > 0 {
            table.add("leader failover, kill -9 to the next acknowledged write (\(failovers) runs)", unit: "ms", better: .lower, failoverTimes)
        }

        let heading =
            "Side by side on one machine (\(ProcessInfo.processInfo.activeProcessorCount) cores), 3 members each on loopback, "
            + "one load generator: \(compared.map(\.version).joined(separator: ", ")); \(keys) keys of 16 bytes, 64-byte values; "
            + "medians of \(rounds) rounds of \(seconds) s (spread in brackets); ratio: Circuit beside the better of the others (above 1: Circuit leads)."
        let markdown = table.markdown(heading: heading)
        print("")
        print(markdown)
        try FileManager.default.createDirectory(atPath: results, withIntermediateDirectories: true)
        let stamp = ISO8601DateFormatter().string(from: Date()).replacingOccurrences(of: ":", with: "")
        try markdown.write(toFile: "\(results)/compare-\(stamp).md", atomically: true, encoding: .utf8)
        try table.json(heading: heading).write(to: URL(fileURLWithPath: "\(results)/compare-\(stamp).json"))
        print("Written to \(results)/compare-\(stamp).md and .json")
    }

    enum Operation: String, CaseIterable {
        case writes = "writes"
        case reads = "linearizable reads"
        case cas = "compare-and-sets"
    }

    struct LoadRun {
        var throughput: Double
        var p50: Double
        var p99: Double
        var mismatches: Int
    }

    private static let value = [UInt8](repeating: UInt8(ascii: "v"), count: 64)
    private static func key(_ i: Int) -> String { name("/bench/k", i) }

    /// `prefix` and `i` in eight digits ("/bench/k00000042"). Not `String(format:)`: the load generator names a key
    /// for every operation, and Foundation's formatting (through the locale) cost more than the rest of its loop.
    private static func name(_ prefix: String, _ i: Int) -> String {
        let digits = String(i)
        return prefix + String(repeating: "0", count: max(0, 8 - digits.utf8.count)) + digits
    }

    /// Progress, on standard error: the table alone goes to standard output.
    private func note(_ line: String) {
        FileHandle.standardError.write(Data("bench compare: \(line)\n".utf8))
    }

    /// etcd and ZooKeeper come from Debian's packages; installed if missing, and said so.
    private func installMissing(_ names: [String]) throws {
        var packages: [String] = []
        if names.contains("etcd"), !FileManager.default.isExecutableFile(atPath: "/usr/bin/etcd") { packages.append("etcd-server") }
        if names.contains("zookeeper"), !FileManager.default.fileExists(atPath: "/usr/share/java/zookeeper.jar") { packages.append("zookeeper") }
        guard !packages.isEmpty else { return }
        note("installing \(packages.joined(separator: " ")) with apt-get (missing)")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["apt-get", "install", "-y", "-q"] + packages
        process.environment = ProcessInfo.processInfo.environment.merging(["DEBIAN_FRONTEND": "noninteractive"]) { $1 }
        process.standardOutput = FileHandle.standardError
        try process.run()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw ValidationError("apt-get install \(packages.joined(separator: " ")) failed (status \(process.terminationStatus)); or pass --systems circuit")
        }
    }

    /// The keys every run chooses from, created through 16 connections.
    private func createKeys(_ s: any ComparedSystem) async throws {
        let keys = self.keys
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            for c in 0..<16 {
                tasks.addTask {
                    try await Self.client(of: s, member: c % 3) { connection in
                        for k in stride(from: c, to: keys, by: 16) { try await connection.put(Self.key(k), Self.value) }
                    }
                }
            }
            try await tasks.waitForAll()
        }
    }

    /// One client of the load: `body` with a new connection to `member`, run on the connection's event loop, so the
    /// generator's own cost per call (which shares the cores with the members) is a write and a read of the socket,
    /// with no thread woken to resume the client; then the connection is closed.
    private static func client<T: Sendable>(
        of s: any ComparedSystem, member: Int, _ body: (any ComparedConnection) async throws -> T
    ) async throws -> T {
        let connection = try await s.connect(member)
        let result = try await withTaskExecutorPreference(connection.taskExecutor) { try await body(connection) }
        await connection.close()
        return result
    }

    /// `clients` closed loops, each on its own connection to one of the members (`client(of:member:_:)`), for
    /// `seconds` after a warm-up.
    /// Compare-and-set: each client sets its own key at the version it last saw, so none should find another.
    /// A window in which no operation started and finished (one stalled across all of it: an election on a loaded
    /// machine) is stretched until one has, at most 30 s more, and the rate is over the time it took.
    private func load(_ s: any ComparedSystem, _ op: Operation, clients: Int) async throws -> LoadRun {
        let clock = ContinuousClock()
        let warm = clock.now + .seconds(1)
        let end = warm + .milliseconds(Int64(seconds * 1000))
        let keys = self.keys
        let keyNames = (0..<keys).map(Self.key)
        let measured = SharedBox<(count: Int, last: ContinuousClock.Instant)>((0, warm))
        let parts = try await withThrowingTaskGroup(of: ([Double], Int).self) { tasks in
            for c in 0..<clients {
                tasks.addTask {
                    try await Self.client(of: s, member: c % 3) { connection in
                        var latencies: [Double] = []
                        latencies.reserveCapacity(1 << 14)
                        var mismatches = 0
                        let own = Self.key(c)
                        var version = op == .cas ? try await connection.read(own) : 0
                        // Seeded once from the system: `SystemRandomNumberGenerator` asks the kernel for every number.
                        var rng = SplitMix64(seed: UInt64.random(in: .min ... .max))
                        while true {
                            let start = clock.now
                            if start >= end && (measured.withLock { $0.count } > 0 || start >= end + .seconds(30)) { break }
                            switch op {
                            case .writes:
                                try await connection.put(keyNames[Int.random(in: 0..<keys, using: &rng)], Self.value)
                            case .reads:
                                _ = try await connection.read(keyNames[Int.random(in: 0..<keys, using: &rng)])
                            case .cas:
                                if let next = try await connection.compareAndSet(own, version: version, Self.value) {
                                    version = next
                                } else {
                                    mismatches += 1
                                    version = try await connection.read(own)
                                }
                            }
                            if start >= warm {
                                let done = clock.now
                                latencies.append(start.duration(to: done).milliseconds)
                                measured.withLock {
                                    $0.count += 1
                                    $0.last = max($0.last, done)
                                }
                            }
                        }
                        return (latencies, mismatches)
                    }
                }
            }
            var all: [([Double], Int)] = []
            for try await part in tasks { all.append(part) }
            return all
        }
        let latencies = parts.flatMap(\.0).sorted()
        return LoadRun(
            throughput: Double(latencies.count) / max(seconds, warm.duration(to: measured.withLock { $0.last }).seconds), p50: percentile(latencies, 0.5), p99: percentile(latencies, 0.99),
            mismatches: parts.reduce(0) { $0 + $1.1 })
    }

    /// A watcher on member 0, a writer on member 1: from each write's call to the watcher's notification.
    /// The writes are 20 ms apart, so ZooKeeper's one-shot watch is armed again before the next.
    private func watchDelivery(_ s: any ComparedSystem) async throws -> [Double] {
        let key = "/bench/watched"
        let clock = ContinuousClock()
        let writer = try await s.connect(1)
        try await writer.put(key, Self.value)
        let watcher = try await s.connect(0)
        let (arrivals, arrived) = AsyncStream.makeStream(of: ContinuousClock.Instant.self)
        try await watcher.watch(key) { arrived.yield(clock.now) }
        var iterator = arrivals.makeAsyncIterator()
        var latencies: [Double] = []
        for _ in 0..<watchSamples {
            let start = clock.now
            try await writer.put(key, Self.value)
            // A notification that never comes ends the stream, and the figure with an error.
            let watchdog = Task {
                guard (try? await Task.sleep(for: .seconds(5))) != nil else { return }
                arrived.finish()
            }
            let seen = await iterator.next()
            watchdog.cancel()
            guard let seen else { throw ValidationError("\(s.name): a watcher was not notified of a write within 5 s") }
            latencies.append(start.duration(to: seen).milliseconds)
            try await Task.sleep(for: .milliseconds(20))
        }
        await watcher.close()
        await writer.close()
        return latencies.sorted()
    }

    /// `inserts` keys that do not exist yet, created (compare-and-set at version 0) by 16 clients; creates per second.
    private func insertMany(_ s: any ComparedSystem) async throws -> Double {
        let inserts = self.inserts
        let clock = ContinuousClock()
        let start = clock.now
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            for c in 0..<16 {
                tasks.addTask {
                    try await Self.client(of: s, member: c % 3) { connection in
                        for k in stride(from: c, to: inserts, by: 16) {
                            let key = Self.name("/bench/n", k)
                            guard try await connection.compareAndSet(key, version: 0, Self.value) != nil else {
                                throw ValidationError("\(s.name): \(key) existed before it was created")
                            }
                        }
                    }
                }
            }
            try await tasks.waitForAll()
        }
        return Double(inserts) / start.duration(to: clock.now).seconds
    }

    /// Kills the leader, then writes through each other member until one write is acknowledged: the time from the
    /// kill to that acknowledgement. Each surviving member has a lane of attempts, each a fresh connection and one
    /// write: an attempt that fails is followed by the next 10 ms later (the figure's resolution; faster would take
    /// the CPU the election needs); one still waiting after 200 ms is left to finish and another starts beside it,
    /// as a client with a 200 ms timeout would retry (etcd holds a write forwarded to a dead leader for 7 s). The
    /// killed member is restarted before the next round.
    private func failover(_ s: any ComparedSystem, round: Int) async throws -> Double {
        let leader = try await s.leader()
        let clock = ContinuousClock()
        let killed = clock.now
        s.kill9(leader)
        let (successes, succeeded) = AsyncStream.makeStream(of: ContinuousClock.Instant.self)
        let started = TaskList()
        let lanes = (0..<3).filter { $0 != leader }.map { member in
            Task {
                while !Task.isCancelled {
                    let done = Counter()
                    let attempt = Task {
                        if let connection = try? await s.connect(member) {
                            if (try? await connection.put("/bench/failover", Array("\(round)".utf8))) != nil {
                                succeeded.yield(clock.now)
                            }
                            await connection.close()
                        }
                        done.add(1)
                    }
                    started.add(attempt)
                    let patience = clock.now + .milliseconds(200)
                    while done.value == 0, clock.now < patience, !Task.isCancelled {
                        try? await Task.sleep(for: .milliseconds(10))
                    }
                }
            }
        }
        let watchdog = Task {
            guard (try? await Task.sleep(for: .seconds(30))) != nil else { return }
            succeeded.finish()
        }
        var first: ContinuousClock.Instant?
        for await instant in successes {
            first = instant
            break
        }
        watchdog.cancel()
        for lane in lanes { lane.cancel() }
        started.cancelAll()
        guard let first else { throw ValidationError("\(s.name): no write acknowledged within 30 s of killing the leader") }
        try await s.restart(leader)
        return killed.duration(to: first).milliseconds
    }
}

/// Tasks started by several tasks, cancelled together.
final class TaskList: Sendable {
    private let tasks = Mutex<[Task<Void, Never>]>([])
    func add(_ task: Task<Void, Never>) { tasks.withLock { $0.append(task) } }
    func cancelAll() { for task in tasks.withLock({ $0 }) { task.cancel() } }
}

/// The `q` quantile of sorted `values` (0 if none).
func percentile(_ sorted: [Double], _ q: Double) -> Double {
    guard !sorted.isEmpty else { return 0 }
    return sorted[min(sorted.count - 1, max(0, Int((Double(sorted.count) * q).rounded(.up)) - 1))]
}

/// A value shared by concurrent tasks, under a lock.
final class SharedBox<Value: Sendable>: Sendable {
    private let state: Mutex<Value>
    init(_ value: Value) { state = Mutex(value) }
    func withLock<R: Sendable>(_ body: (inout Value) -> R) -> R { state.withLock { body(&$0) } }
}

extension Duration {
    var seconds: Double { self / .seconds(1) }
}

/// The comparison's rows: per system the values of its rounds (or of its members), summarised by their median (or
/// the largest), with the spread, and Circuit's ratio to the better of the others.
struct ComparisonTable {
    enum Better: String, Codable { case higher, lower }
    enum Summary { case median, largest }

    struct Row: Codable {
        let figure: String
        let unit: String
        let better: Better
        /// Per system: every round's value (or every member's).
        let values: [String: [Double]]
        /// Per system: the median (or the largest).
        let summary: [String: Double]
        /// Circuit beside the better of the others (not Circuit through HTTP), above 1 when Circuit leads; nil without
        /// Circuit or another.
        let ratio: Double?
    }

    let systems: [String]
    private(set) var rows: [Row] = []

    init(systems: [String]) { self.systems = systems }

    mutating func add(_ figure: String, unit: String, better: Better, _ values: [String: [Double]], summary: Summary = .median) {
        let summarised = values.compactMapValues { v -> Double? in
            guard !v.isEmpty else { return nil }
            return summary == .median ? v.sorted()[v.count / 2] : v.max()!
        }
        var ratio: Double?
        if let ours = summarised["Circuit"] {
            let others = summarised.filter { !$0.key.hasPrefix("Circuit") }.map(\.value)
            if let best = better == .higher ? others.max() : others.min(), best > 0, ours > 0 {
                ratio = better == .higher ? ours / best : best / ours
            }
        }
        rows.append(Row(figure: figure, unit: unit, better: better, values: values, summary: summarised, ratio: ratio))
    }

    func markdown(heading: String) -> String {
        var lines = [heading, "", "| figure | unit | " + systems.joined(separator: " | ") + " | ratio |"]
        lines.append("|---|---|" + systems.map { _ in "---:|" }.joined() + "---:|")
        for row in rows {
            let cells = systems.map { name -> String in
                guard let s = row.summary[name], let v = row.values[name] else { return "" }
                let main = Self.format(s)
                return v.count > 1 ? "\(main) (\(Self.format(v.min()!))–\(Self.format(v.max()!)))" : main
            }
            let ratio = row.ratio.map { String(format: "%.2f×", $0) } ?? ""
            lines.append("| \(row.figure) | \(row.unit) | " + cells.joined(separator: " | ") + " | \(ratio) |")
        }
        return lines.joined(separator: "\n") + "\n"
    }

    func json(heading: String) throws -> Data {
        struct Document: Codable {
            let heading: String
            let systems: [String]
            let rows: [Row]
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return try encoder.encode(Document(heading: heading, systems: systems, rows: rows))
    }

    /// Three significant figures, thousands grouped.
    static func format(_ x: Double) -> String {
        if x >= 100 {
            let formatter = NumberFormatter()
            formatter.numberStyle = .decimal
            formatter.maximumFractionDigits = 0
            return formatter.string(from: NSNumber(value: x.rounded())) ?? String(format: "%.0f", x)
        }
        return x >= 10 ? String(format: "%.1f", x) : String(format: "%.2f", x)
    }
}
