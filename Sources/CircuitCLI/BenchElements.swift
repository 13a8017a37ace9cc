import ArgumentParser
import CircuitAPI
import CircuitClient
import CircuitNode
import Foundation
import NIOCore
import Synchronization

/// `circuit bench elements`: the circuit's elements on a 3-node cluster of real daemons on loopback: channel messages
/// per second, bulk bytes through a channel and through a process's stdout and stdin beside raw TCP on the same machine, and the
/// time from creating a process (or a job) to learning that it ended.
struct ElementsBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "elements",
        abstract: "Channel messages/s, MB/s through a channel and a process's stdout and stdin beside raw TCP, process and job latency.")

    @Option(help: "Seconds measured per run.") var seconds: Double = 2
    @Option(help: "Rounds per row; the table shows the median and the spread.") var rounds: Int = 3
    @Option(help: "Processes and jobs timed for the latency rows.") var samples: Int = 20
    @Option(help: "Folder for the daemons' data (default: a temporary folder, removed afterwards).") var data: String?

    func run() async throws {
        let base = data ?? temporaryDirectory("circuit-bench-elements")
        defer { if data == nil { try? FileManager.default.removeItem(atPath: base) } }
        let binary = URL(fileURLWithPath: CommandLine.arguments[0]).standardizedFileURL.path
        let daemons = try DaemonProcesses(binary: binary, base: base, count: 3, portRange: cliPortRange)
        defer { daemons.stopAll() }
        try daemons.startAll()
        let leader = try await daemons.leader()
        _ = try await daemons.allAlive()
        var client = daemons.client(leader)
        client.timeout = 60
        // The elements live on a follower; the client reaches it directly.
        let host = daemons.members[(leader + 1) % 3].folder.hostID
        var rows: [(String, String, [Double])] = []
        var serial = 0
        func fresh(_ name: String) -> String {
            serial += 1
            return "/\(host)/bench/\(name)-\(serial)"
        }

        for (pairs, capacity) in [(1, 0), (1, 64), (16, 64)] {
            var rates: [Double] = []
            for _ in 0..<rounds {
                let path = fresh("chan")
                try await client.makeChannel(path, capacity: UInt32(capacity))
                let chan = try await client.channel(path)
                progress("\(pairs) sender(s), capacity \(capacity)")
                rates.append(try await messages(chan, pairs: pairs, size: 64) / seconds)
            }
            rows.append(("channel messages/s, 64 B, \(pairs) sender\(pairs == 1 ? "" : "s") and receiver\(pairs == 1 ? "" : "s"), capacity \(capacity)", "msg/s", rates))
        }

        var piped: [Double] = []
        for _ in 0..<rounds {
            let path = fresh("piped")
            try await client.makeChannel(path, capacity: 1024)
            progress("pipelined 64 B")
            piped.append(try await pipelined(try await client.channel(path)) / seconds)
        }
        rows.append(("channel messages/s, 64 B, a pipelining sender (1,000 a request) and a streaming receiver, capacity 1024", "msg/s", piped))

        var streamedMB: [Double] = []
        var channelMB: [Double] = []
        var arrayMB: [Double] = []
        var stdoutMB: [Double] = []
        var stdinMB: [Double] = []
        var tcpMB: [Double] = []
        var relayMB: [Double] = []
        // Each round measures raw TCP, the streamed channel and the relay one after the other, so that the channel's
        // ratio to each is taken from figures seconds apart (the machine's speed drifts between rounds).
        for _ in 0..<rounds {
            progress("raw TCP")
            tcpMB.append(try await onThread { try Self.rawTCP(seconds: seconds) })
            let path = fresh("bulk")
            try await client.makeChannel(path, capacity: 4)
            let chan = try await client.channel(path)
            progress("bulk channel, streamed")
            streamedMB.append(try await pipelined(chan, size: 1 << 20, batch: 1, buffers: true, streaming: true) * Double(1 << 20) / seconds / 1e6)
            progress("raw TCP relayed")
            relayMB.append(try await onThread { try Self.rawTCP(seconds: seconds, relayed: true) })
            progress("bulk channel")
            let batched = fresh("bulk-batched")
            try await client.makeChannel(batched, capacity: 4)
            channelMB.append(
                try await pipelined(try await client.channel(batched), size: 1 << 20, batch: 8, buffers: true) * Double(1 << 20) / seconds / 1e6)
            progress("bulk channel, byte arrays")
            let arrays = fresh("bulk-arrays")
            try await client.makeChannel(arrays, capacity: 4)
            arrayMB.append(try await pipelined(try await client.channel(arrays), size: 1 << 20, batch: 8) * Double(1 << 20) / seconds / 1e6)
            progress("stdout")
            stdoutMB.append(try await stdout(client, fresh("out")))
            progress("stdin")
            stdinMB.append(try await stdin(client, fresh("in")))
        }
        rows.append(("channel bulk, 1 MiB messages, capacity 4, a streaming sender (one request) and a streaming receiver, as ByteBuffers", "MB/s", streamedMB))
        rows.append(("the same with a pipelining sender (8 a request)", "MB/s", channelMB))
        rows.append(("the same as byte arrays (each message copied into the request and out of the answer)", "MB/s", arrayMB))
        rows.append(("a process's stdout read by a client (head -c of /dev/zero)", "MB/s", stdoutMB))
        rows.append(("a process's stdin written by a client (cat into /dev/null), streamed in 1 MiB chunks", "MB/s", stdinMB))
        rows.append(("raw TCP on loopback, one connection, 1 MiB writes (the baseline)", "MB/s", tcpMB))
        rows.append(("raw TCP through a relay thread, two connections, 1 MiB writes (a channel's ceiling)", "MB/s", relayMB))

        progress("latencies")
        var procLatency: [Double] = []
        var jobLatency: [Double] = []
        for _ in 0..<samples {
            let start = ContinuousClock.now
            let path = fresh("true")
            _ = try await client.run(path, ProcCommandView(path: "/bin/true"))
            _ = try await client.wait(path)
            procLatency.append((ContinuousClock.now - start).milliseconds)
            let jobStart = ContinuousClock.now
            let job = "/jobs/bench-\(serial)"
            _ = try await client.run(job, ProcCommandView(path: "/bin/true"))
            _ = try await client.wait(job)
            jobLatency.append((ContinuousClock.now - jobStart).milliseconds)
        }
        var selectLatency: [Double] = []
        let left = fresh("sel-left"), right = fresh("sel-right")
        try await client.makeChannel(left, capacity: 0)
        try await client.makeChannel(right, capacity: 0)
        let rightChan = try await client.channel(right)
        for i in 0..<samples {
            let select = fresh("select")
            try await client.makeSelect(select, clauses: [SelectClauseView(op: "recv", chan: left), SelectClauseView(op: "recv", chan: right)])
            // A sender already waits on one of the channels: the time is the select's own, offer to commit.
            let sender = Task { try await rightChan.send(Array("s\(i)".utf8)) }
            try await waitUntil { (try? await rightChan.stat())?.waitingSenders == 1 }
            let start = ContinuousClock.now
            _ = try await client.select(select)
            selectLatency.append((ContinuousClock.now - start).milliseconds)
            _ = try await sender.value
        }
        rows.append(("select over two channels on another host, one with a waiting sender: wait answered", "ms", selectLatency))
        rows.append(("process /bin/true: create, start, exit, wait answered", "ms", procLatency))
        // mkproc to running: from asking for the process to the cluster's change that records it running.
        var toRunning: [Double] = []
        for _ in 0..<samples {
            let path = fresh("run")
            let start = ContinuousClock.now
            let created = try await client.run(path, ProcCommandView(path: "/bin/true"))
            for try await event in client.watch(path, from: created.revision + 1) where event.path == path {
                toRunning.append((ContinuousClock.now - start).milliseconds)
                break
            }
        }
        rows.append(("mkproc to running (create acknowledged, started, its running phase committed and seen by a watch)", "ms", toRunning))
        rows.append(("job /bin/true: create, placed by the leader, start, exit, wait answered", "ms", jobLatency))

        print("Elements benchmark: 3 daemons on loopback, elements on a follower, reached directly; medians of \(rounds) rounds of \(seconds) s (latency: \(samples) samples)")
        print("")
        printMedianTable(rows)
        let tcp = median(tcpMB)
        print("")
        // Per round: the streamed channel beside the raw TCP and the relay measured next to it.
        let ofTCP = zip(streamedMB, tcpMB).map { $0 / $1 }.sorted()
        let ofRelay = zip(streamedMB, relayMB).map { $0 / $1 }.sorted()
        print(String(format: "Channel bulk (streamed) is %.2f of raw TCP (rounds %.2f–%.2f) and %.2f of the relay (%.2f–%.2f), medians of the ratios of each round; %.2f of raw TCP with a pipelining sender; stdout %.2f of raw TCP, stdin %.2f; the relay %.2f.", median(ofTCP), ofTCP.first!, ofTCP.last!, median(ofRelay), ofRelay.first!, ofRelay.last!, median(channelMB) / tcp, median(stdoutMB) / tcp, median(stdinMB) / tcp, median(relayMB) / tcp))
    }

    /// Progress, on standard error: the table alone goes to standard output.
    private func progress(_ step: String) {
        FileHandle.standardError.write(Data("bench elements: \(step)\n".utf8))
    }

    /// Messages received in `seconds` with `pairs` senders and receivers of `size`-byte messages.
    private func messages(_ chan: Chan, pairs: Int, size: Int) async throws -> Double {
        let message = [UInt8](repeating: 0x6d, count: size)
        let received = Counter()
        let deadline = ContinuousClock.now + .milliseconds(Int64(seconds * 1000))
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<pairs {
                group.addTask {
                    while ContinuousClock.now < deadline { try await chan.send(message) }
                }
                group.addTask {
                    while true {
                        do {
                            _ = try await chan.receive()
                            received.add(1)
                        } catch {
                            if case .api(let e)? = error as? CircuitClientError, e.code == "closed" { return }
                            throw error
                        }
                    }
                }
            }
            // When every sender stopped, close: the receivers drain what is held, then see it closed.
            try await group.next()
            for _ in 1..<pairs { try await group.next() }
            try await chan.close()
            try await Self.allOrNone(&group)
        }
        return Double(received.value)
    }

    /// Messages received in `seconds` from one sender sending 1,000 at a time, by one receiver streaming them.
    /// `buffers`: through the library's ByteBuffer calls (a large message is neither copied into the request nor out of
    /// the answer) instead of its byte-array ones.
    private func pipelined(
        _ chan: Chan, size: Int = 64, batch count: Int = 1000, buffers: Bool = false, streaming: Bool = false
    ) async throws -> Double {
        let batch = [[UInt8]](repeating: [UInt8](repeating: 0x70, count: size), count: count)
        let bufferBatch = [ByteBuffer](repeating: ByteBuffer(repeating: 0x70, count: size), count: count)
        let received = Counter()
        let deadline = ContinuousClock.now + .milliseconds(Int64(seconds * 1000))
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                do {
                    while ContinuousClock.now < deadline {
                        if streaming {
                            // One request for the whole run: the same buffer, sent until the deadline.
                            let message = bufferBatch[0]
                            try await chan.send(streaming: AsyncStream { ContinuousClock.now < deadline ? message : nil })
                        } else if buffers {
                            try await chan.send(contentsOf: bufferBatch)
                        } else {
                            try await chan.send(contentsOf: batch)
                        }
                    }
                    try await chan.close()
                } catch {
                    progress("the sender failed: \(error)")
                    throw error
                }
                progress("the sender closed the channel")
            }
            group.addTask {
                do {
                    while true {
                        let n = buffers
                            ? try await chan.receive(upTo: 1_000_000) { (_: [ByteBuffer]) in received.add(1) }
                            : try await chan.receive(upTo: 1_000_000) { (_: [UInt8]) in received.add(1) }
                        if n < 1_000_000 { break }  // closed and drained
                    }
                } catch {
                    progress("the receiver failed: \(error)")
                    throw error
                }
                progress("the receiver drained it")
            }
            try await Self.allOrNone(&group)
        }
        return Double(received.value)
    }

    /// Waits for every task of `group`; the first that fails cancels the others (a receiver whose sender failed
    /// would otherwise wait for ever on a channel nobody closes) and its error is thrown.
    private static func allOrNone(_ group: inout ThrowingTaskGroup<Void, any Error>) async throws {
        // Not waitForAll: it waits for every task even after one has failed.
        while !group.isEmpty {
            do {
                try await group.next()
            } catch {
                group.cancelAll()
                throw error
            }
        }
    }

    private func waitUntil(_ condition: () async -> Bool) async throws {
        let deadline = ContinuousClock.now + .seconds(10)
        while await !condition() {
            guard ContinuousClock.now < deadline else { throw ValidationError("the benchmark's setup did not settle within 10 s") }
            try await Task.sleep(for: .milliseconds(1))
        }
    }

    /// MB/s of a process's stdout: 1 GB of zeros, or as much as `seconds` allow.
    private func stdout(_ client: CircuitClient, _ path: String) async throws -> Double {
        _ = try await client.run(path, ProcCommandView(path: "/usr/bin/head", args: ["-c", "1000000000", "/dev/zero"]))
        let owner = try await client.owner(of: path)
        let bytes = Counter()
        let start = ContinuousClock.now
        let deadline = start + .milliseconds(Int64(seconds * 1000))
        struct Enough: Error {}
        do {
            try await owner.readOutput(path) { chunk in
                bytes.add(chunk.count)
                if ContinuousClock.now > deadline { throw Enough() }
            }
        } catch {
            // Stopped reading at the deadline (the reader's own error ends the stream), or failed before it.
            guard ContinuousClock.now > deadline else { throw error }
        }
        let elapsed = (ContinuousClock.now - start).milliseconds / 1000
        _ = try? await client.remove(element: path)
        return Double(bytes.value) / elapsed / 1e6
    }

    /// MB/s into a process's stdin: one streamed request (`writeStdin(_:streaming:)`) of 1 MiB chunks for `seconds`,
    /// into a `cat` that writes to /dev/null; timed until the host answered (every byte is in the pipe).
    private func stdin(_ client: CircuitClient, _ path: String) async throws -> Double {
        _ = try await client.run(path, ProcCommandView(path: "/bin/sh", args: ["-c", "exec cat > /dev/null"]))
        let chunk = ByteBuffer(repeating: 0x61, count: 1 << 20)
        let bytes = Counter()
        let start = ContinuousClock.now
        let deadline = start + .milliseconds(Int64(seconds * 1000))
        let chunks = AsyncStream<ByteBuffer>(unfolding: {
            guard ContinuousClock.now < deadline else { return nil }
            bytes.add(chunk.readableBytes)
            return chunk
        })
        let written = try await client.writeStdin(path, streaming: chunks)
        let elapsed = (ContinuousClock.now - start).milliseconds / 1000
        guard written.bytes == bytes.value else {
            throw ValidationError("stdin: \(written.bytes) bytes written of \(bytes.value) sent")
        }
        _ = try? await client.remove(element: path)
        return Double(bytes.value) / elapsed / 1e6
    }

    /// MB/s of one loopback TCP connection, 1 MiB writes, plain sockets on two threads. `relayed`: through a third
    /// thread that reads each chunk from the sender's connection and writes it to the reader's, as any host holding a
    /// channel's buffer between two others must: the ceiling of a channel between two clients (two connections' worth
    /// of copies on the same cores).
    static func rawTCP(seconds: Double, relayed: Bool = false) throws -> Double {
        let (server, address) = try listener()
        defer { close(server) }
        let total = Counter()
        let reader = Thread {
            let connection = accept(server, nil, nil)
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            while true {
                let n = buffer.withUnsafeMutableBytes { read(connection, $0.baseAddress, $0.count) }
                if n <= 0 { break }
                total.add(n)
            }
            close(connection)
        }
        reader.start()
        var target = address
        if relayed {
            let (relay, relayAddress) = try listener()
            target = relayAddress
            Thread {
                let incoming = accept(relay, nil, nil)
                close(relay)
                let outgoing = dial(address)
                var buffer = [UInt8](repeating: 0, count: 1 << 20)
                relaying: while true {
                    let n = buffer.withUnsafeMutableBytes { read(incoming, $0.baseAddress, $0.count) }
                    if n <= 0 { break }
                    var sent = 0
                    while sent < n {
                        let w = buffer.withUnsafeBytes { write(outgoing, $0.baseAddress! + sent, n - sent) }
                        guard w > 0 else { break relaying }
                        sent += w
                    }
                }
                close(incoming)
                close(outgoing)
            }.start()
        }
        let client = dial(target)
        let chunk = [UInt8](repeating: 0x74, count: 1 << 20)
        let start = ContinuousClock.now
        let deadline = start + .milliseconds(Int64(seconds * 1000))
        while ContinuousClock.now < deadline {
            var sent = 0
            while sent < chunk.count {
                let n = chunk.withUnsafeBytes { write(client, $0.baseAddress! + sent, $0.count - sent) }
                guard n > 0 else { break }
                sent += n
            }
        }
        let elapsed = (ContinuousClock.now - start).milliseconds / 1000
        close(client)
        return Double(total.value) / elapsed / 1e6
    }

    /// A listening socket on a free loopback port, and its address.
    private static func listener() throws -> (Int32, sockaddr_in) {
        let server = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(server, $0, length) } }
        guard bound == 0, listen(server, 1) == 0 else { throw ValidationError("cannot listen on loopback: errno \(errno)") }
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(server, $0, &length) } }
        return (server, address)
    }

    private static func dial(_ address: sockaddr_in) -> Int32 {
        let client = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = address
        _ = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(client, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        return client
    }
}

/// Rows of figures as a Markdown table: the median of each row's values and their spread (with p99 for latencies,
/// in ms).
func printMedianTable(_ rows: [(String, String, [Double])]) {
    print("| figure | median | spread (p99 for latencies) | unit |")
    print("|---|---:|---:|---|")
    for (name, unit, values) in rows {
        let sorted = values.sorted()
        let median = sorted[sorted.count / 2]
        if unit == "ms" {
            let p99 = percentile(sorted, 0.99)
            print(String(format: "| %@ | %.1f | %.1f–%.1f (p99 %.1f) | %@ |", name, median, sorted.first!, sorted.last!, p99, unit))
        } else {
            print(String(format: "| %@ | %.1f | %.1f–%.1f | %@ |", name, median, sorted.first!, sorted.last!, unit))
        }
    }
}

/// The median of `values`.
func median(_ values: [Double]) -> Double { values.sorted()[values.count / 2] }

func onThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        Thread { continuation.resume(with: Result { try body() }) }.start()
    }
}

/// A count shared by tasks or threads.
final class Counter: Sendable {
    private let count = Atomic<Int>(0)
    func add(_ n: Int) { count.add(n, ordering: .relaxed) }
    var value: Int { count.load(ordering: .relaxed) }
}
