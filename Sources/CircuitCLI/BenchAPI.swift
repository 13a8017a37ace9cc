import ArgumentParser
import CircuitClient
import CircuitNode
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix

/// `circuit bench api`: a 3-node cluster of real daemons on loopback driven through its HTTP API, the load shape of
/// the etcd and ZooKeeper figures in shared/reference/performance-anchors.md.
struct APIBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "api",
        abstract: "Writes and linearizable reads per second, p50/p99 latency, leader failover and RSS of 3 daemons on loopback.")

    @Option(help: "Concurrent clients, comma-separated; each has its own connection, spread over the 3 nodes.")
    var clients: String = "1,16,64"
    @Option(help: "Seconds measured per run (after a one-second warm-up).") var seconds: Double = 5
    @Option(help: "Rounds per row; the table shows the median and the spread.") var rounds: Int = 3
    @Option(help: "Leader kills for the failover figure.") var failovers: Int = 5
    @Option(help: "Keys pre-created and chosen uniformly.") var keys: Int = 10_000
    @Option(help: "Folder for the daemons' data (default: a temporary folder, removed afterwards).") var data: String?

    struct Run {
        var throughput: Double
        var p50: Double
        var p99: Double
    }

    func run() async throws {
        let counts = clients.split(separator: ",").compactMap { Int($0) }
        guard !counts.isEmpty, counts.allSatisfy({ $0 > 0 }) else { throw ValidationError("--clients: positive numbers") }
        let base = data ?? temporaryDirectory("circuit-bench-api")
        defer { if data == nil { try? FileManager.default.removeItem(atPath: base) } }
        let binary = URL(fileURLWithPath: CommandLine.arguments[0]).standardizedFileURL.path
        let daemons = try DaemonProcesses(binary: binary, base: base, count: 3, portRange: cliPortRange)
        defer { daemons.stopAll() }
        try daemons.startAll()
        _ = try await daemons.leader()
        _ = try await daemons.allAlive()
        let group = MultiThreadedEventLoopGroup.singleton
        let value = ByteBuffer(bytes: [UInt8](repeating: UInt8(ascii: "v"), count: 64))
        let keyPaths = (0..<keys).map { "/v1/records/bench/k" + String(format: "%08d", $0) }

        // Pre-create the keys through 16 connections.
        let apis = daemons.apis
        let keys = self.keys
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            for c in 0..<16 {
                tasks.addTask {
                    let api = apis[c % 3]
                    let connection = try await HTTPLoadConnection.connect(api, group: group)
                    try await connection.channel.executeThenClose { inbound, outbound in
                        var session = HTTPLoadConnection.Session(inbound: inbound, outbound: outbound, host: api)
                        for k in stride(from: c, to: keys, by: 16) {
                            let status = try await session.request(.PUT, keyPaths[k], body: value)
                            guard status == 200 else { throw ValidationError("pre-creating \(keyPaths[k]): HTTP \(status)") }
                        }
                    }
                }
            }
            try await tasks.waitForAll()
        }

        var rows: [(String, [Run])] = []
        for n in counts {
            for (name, method) in [("writes", HTTPMethod.PUT), ("linearizable reads", HTTPMethod.GET)] {
                var runs: [Run] = []
                for _ in 0..<rounds {
                    runs.append(try await load(daemons, group: group, clients: n, method: method, value: value, keyPaths: keyPaths))
                }
                rows.append(("\(name), \(n) client\(n == 1 ? "" : "s")", runs))
            }
        }
        let rss = daemons.members.indices.map { daemons.residentBytes($0) }

        // Failover: kill -9 the leader, time until a write through any live node succeeds; restart it.
        var failoverTimes: [Double] = []
        for round in 0..<failovers {
            let leader = try await daemons.leader()
            let clock = ContinuousClock()
            let killed = clock.now
            daemons.kill9(leader)
            let others = daemons.members.indices.filter { $0 != leader }
            var done = false
            while !done {
                for i in others {
                    var client = daemons.client(i)
                    client.timeout = 1
                    if (try? await client.put("/records/bench/failover", Array("\(round)".utf8))) != nil {
                        done = true
                        break
                    }
                }
                guard killed.duration(to: clock.now) < .seconds(30) else { throw ValidationError("no write for 30 s after a kill") }
            }
            failoverTimes.append(killed.duration(to: clock.now).milliseconds)
            try daemons.start(leader)
            _ = try await daemons.leader()
            _ = try await daemons.allAlive()
        }

        print("Circuit HTTP API: 3 daemons on loopback, \(keys) keys of 16 bytes, 64-byte values, \(rounds) rounds of \(seconds) s per row, medians")
        print("")
        print("| figure | ops/s | spread | p50 ms | p99 ms |")
        print("|---|---:|---:|---:|---:|")
        for (name, runs) in rows {
            let sorted = runs.sorted { $0.throughput < $1.throughput }
            let mid = sorted[sorted.count / 2]
            print(String(format: "| %@ | %.0f | %.0f–%.0f | %.2f | %.2f |", name, mid.throughput, sorted.first!.throughput, sorted.last!.throughput, mid.p50, mid.p99))
        }
        let f = failoverTimes.sorted()
        if !f.isEmpty {
            print(String(format: "| leader failover, kill -9 to the next write (%d runs) | median %.0f ms | %.0f–%.0f ms | | |", f.count, f[f.count / 2], f.first!, f.last!))
        }
        print(String(format: "| RSS per member after the load | %@ MB | | | |", rss.map { String(format: "%.0f", Double($0) / 1e6) }.joined(separator: ", ")))
    }

    /// `clients` closed loops, each on its own connection to one of the nodes, for `seconds` after a warm-up.
    private func load(
        _ daemons: DaemonProcesses, group: any EventLoopGroup, clients: Int, method: HTTPMethod, value: ByteBuffer,
        keyPaths: [String]
    ) async throws -> Run {
        let clock = ContinuousClock()
        let apis = daemons.apis
        let warm = clock.now + .seconds(1)
        let end = warm + .milliseconds(Int64(seconds * 1000))
        let latencies = try await withThrowingTaskGroup(of: [Double].self) { tasks in
            for c in 0..<clients {
                tasks.addTask {
                    let api = apis[c % 3]
                    let connection = try await HTTPLoadConnection.connect(api, group: group)
                    return try await connection.channel.executeThenClose { inbound, outbound in
                        var session = HTTPLoadConnection.Session(inbound: inbound, outbound: outbound, host: api)
                        var mine: [Double] = []
                        var rng = SystemRandomNumberGenerator()
                        while true {
                            let start = clock.now
                            if start >= end { break }
                            let path = keyPaths[Int.random(in: 0..<keyPaths.count, using: &rng)]
                            let status = try await session.request(method, path, body: method == .PUT ? value : nil)
                            guard status == 200 else { throw ValidationError("\(method) \(path): HTTP \(status)") }
                            if start >= warm { mine.append(start.duration(to: clock.now).milliseconds) }
                        }
                        return mine
                    }
                }
            }
            var all: [Double] = []
            for try await part in tasks { all += part }
            return all.sorted()
        }
        guard !latencies.isEmpty else { return Run(throughput: 0, p50: 0, p99: 0) }
        return Run(
            throughput: Double(latencies.count) / seconds, p50: latencies[latencies.count / 2],
            p99: latencies[min(latencies.count - 1, latencies.count * 99 / 100)])
    }
}

/// One HTTP/1.1 keep-alive connection (SwiftNIO), used for one request at a time: the load generator's client.
struct HTTPLoadConnection {
    let channel: NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>

    static func connect(_ address: String, group: any EventLoopGroup) async throws -> HTTPLoadConnection {
        let parts = address.split(separator: ":")
        let channel = try await ClientBootstrap(group: group)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connect(host: String(parts[0]), port: Int(parts[1]) ?? 0) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    return try NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>(wrappingChannelSynchronously: channel)
                }
            }
        return HTTPLoadConnection(channel: channel)
    }

    struct Session {
        var iterator: NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator
        let outbound: NIOAsyncChannelOutboundWriter<HTTPClientRequestPart>
        let host: String

        init(inbound: NIOAsyncChannelInboundStream<HTTPClientResponsePart>, outbound: NIOAsyncChannelOutboundWriter<HTTPClientRequestPart>, host: String) {
            self.iterator = inbound.makeAsyncIterator()
            self.outbound = outbound
            self.host = host
        }

        /// Sends one request and reads its whole answer; returns the status.
        mutating func request(_ method: HTTPMethod, _ uri: String, body: ByteBuffer?) async throws -> Int {
            var headers = HTTPHeaders([("Host", host)])
            headers.add(name: "Content-Length", value: "\(body?.readableBytes ?? 0)")
            try await outbound.write(.head(HTTPRequestHead(version: .http1_1, method: method, uri: uri, headers: headers)))
            if let body { try await outbound.write(.body(.byteBuffer(body))) }
            try await outbound.write(.end(nil))
            var status = 0
            while let part = try await iterator.next() {
                switch part {
                case .head(let head): status = Int(head.status.code)
                case .body: break
                case .end: return status
                }
            }
            throw ValidationError("the connection closed during a request")
        }
    }
}
