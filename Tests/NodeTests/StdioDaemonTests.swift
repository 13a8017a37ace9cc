import CircuitAPI
import CircuitClient
import CircuitNode
import CircuitTestSupport
import Foundation
import NIOCore
import Synchronization
import Testing

/// Everything a stream gave, collected by a reader task.
private final class Collected: Sendable {
    let bytes = Mutex<[UInt8]>([])
    func add(_ chunk: [UInt8]) { bytes.withLock { $0 += chunk } }
    var count: Int { bytes.withLock { $0.count } }
}

@Suite("Process streams", .serialized, .timeLimit(.minutes(2)))
struct StdioDaemonTests {
    @Test("stdin, stdout and stderr stream point to point with the owning host: cat echoes what is written, output blocks its writer while unread and loses nothing, one reader at a time, other nodes redirect, and the CLI's mkproc, stdin, stdout and waitall")
    func streams() async throws {
        let cluster = try daemons(3)
        defer { cluster.stopAll(signal: SIGKILL) }
        let leader = try await cluster.leader()
        _ = try await cluster.allAlive()
        let b = (leader + 1) % 3
        let host = cluster.members[b].folder.hostID
        var client = cluster.client(leader)
        client.timeout = 30
        // Started through A (the leader), read and written by a client that asked C.
        let owner = try await cluster.client((leader + 2) % 3).owner(of: "/\(host)/cat")
        #expect(owner.endpoints == [cluster.members[b].api])

        // cat: what goes into stdin comes out of stdout; closing stdin ends it (exit 0).
        _ = try await client.run("/\(host)/cat", ProcCommandView(path: "/bin/cat"))
        let out = Collected()
        let reader = Task { try await owner.readOutput("/\(host)/cat") { out.add($0) } }
        try await owner.writeStdin("/\(host)/cat", Array("hello ".utf8), keepOpen: true)
        try await eventually("the first write echoed") { out.count == 6 }
        let closed = try await owner.writeStdin("/\(host)/cat", Array("world".utf8))
        #expect(closed.bytes == 5 && closed.closed)
        try await reader.value
        #expect(out.bytes.withLock { $0 } == Array("hello world".utf8))
        let cat = try await client.wait("/\(host)/cat")
        #expect(cat.phase == "exited" && cat.exitCode == 0)
        #expect(await apiCode { try await owner.writeStdin("/\(host)/cat", [1]) } == "closed")

        // A stream of writes, asked of A (the library finds the owner): each chunk reaches the process as it comes,
        // while the sequence is still open; its end closes stdin. Refused at once when stdin is closed.
        let streamedCat = "/\(host)/streamed"
        _ = try await client.run(streamedCat, ProcCommandView(path: "/bin/cat"))
        let echoed = Collected()
        let echoReader = Task { try await owner.readOutput(streamedCat) { echoed.add($0) } }
        let (chunks, feed) = AsyncStream.makeStream(of: ByteBuffer.self)
        let asker = client
        let streamed = Task { try await asker.writeStdin(streamedCat, streaming: chunks) }
        feed.yield(ByteBuffer(string: "one "))
        try await eventually("the first chunk echoed while the stream is open") { echoed.count == 4 }
        feed.yield(ByteBuffer(string: "two"))
        feed.finish()
        let view = try await streamed.value
        #expect(view.bytes == 7 && view.closed)
        try await echoReader.value
        #expect(echoed.bytes.withLock { $0 } == Array("one two".utf8))
        #expect(try await client.wait(streamedCat).exitCode == 0)
        #expect(await apiCode { try await client.writeStdin(streamedCat, streaming: AsyncStream<ByteBuffer> { $0.finish() }) } == "closed")

        // A writer that goes away while the process reads nothing (its pipe full, the host waiting to write more)
        // gives stdin back within a second, left open as it asked: the next writer is not refused as busy. Gone
        // either way: the library's writer cancelled (it resets its connection), or a plain client that closes
        // its connection in the middle of the body (a FIN, which waits behind the body the host does not read).
        for hangup in ["reset", "close"] {
            let deaf = "/\(host)/deaf-\(hangup)"
            _ = try await client.run(deaf, ProcCommandView(path: "/bin/sleep", args: ["60"]))
            let pid = try await eventuallySucceeds("\(deaf) running") {
                guard let pid = try await client.peek(deaf).pid, pid > 0 else { throw CancellationError() }
                return pid
            }
            let (flood, flooding) = AsyncStream.makeStream(of: ByteBuffer.self)
            var blocked: Task<StdinView, any Error>?
            var socket: CInt = -1
            if hangup == "reset" {
                blocked = Task { try await asker.writeStdin(deaf, streaming: flood, keepOpen: true) }
                for _ in 0..<3 { flooding.yield(ByteBuffer(repeating: 7, count: 1 << 20)) }
            } else {
                socket = try startStdinRequest(to: cluster.members[b].api, path: deaf, bytes: 3 << 19)
            }
            // Full, within a 64 KiB page run of its MiB (1,044,472 bytes held, here).
            try await eventually("the host has filled the pipe and waits to write more") { stdinHeld(pid) > 15 << 16 }
            if let blocked { blocked.cancel() } else { close(socket) }
            try await eventually("stdin given back once its writer went away (\(hangup))") {
                (try? await owner.writeStdin(deaf, [], keepOpen: false))?.closed == true
            }
            flooding.finish()
            _ = try? await blocked?.value
            _ = try await client.remove(element: deaf)
        }

        // stderr apart from stdout; what was written before the end is still there after it.
        _ = try await client.run("/\(host)/err", ProcCommandView(path: "/bin/sh", args: ["-c", "echo out; echo oops >&2; exit 2"]))
        let failed = try await client.wait("/\(host)/err")
        #expect(failed.exitCode == 2)
        let err = Collected()
        try await owner.readOutput("/\(host)/err", stream: "stderr") { err.add($0) }
        #expect(err.bytes.withLock { $0 } == Array("oops\n".utf8))
        // Read through another node (A, which names B: 307): the library follows the redirect to B.
        let outThroughA = Collected()
        try await client.readOutput("/\(host)/err") { outThroughA.add($0) }
        #expect(outThroughA.bytes.withLock { $0 } == Array("out\n".utf8))

        // 8 MB of output nobody reads: the writer blocks on its pipe (bounded buffers); then read, all of it
        // arrives and the process exits 0.
        let bulk = "/\(host)/bulk"
        _ = try await client.run(bulk, ProcCommandView(path: "/usr/bin/head", args: ["-c", "8000000", "/dev/zero"]))
        try await eventually("the bulk writer running", timeout: .seconds(20)) { (try? await client.peek(bulk))?.phase == "running" }
        let pid = try #require(try await client.peek(bulk).pid)
        try await eventually("the unread writer blocked on its pipe") {
            ((try? String(contentsOfFile: "/proc/\(pid)/wchan", encoding: .utf8)) ?? "").contains("pipe_write")
        }
        let total = Collected()
        try await owner.readOutput(bulk) { total.add($0) }
        #expect(total.count == 8_000_000)
        #expect(try await client.wait(bulk).exitCode == 0)

        // A second reader while one reads is refused. (Of a process that writes a line and then waits: a reader of
        // the 8 MB above may have read it all before a second one asks.)
        let holding = "/\(host)/holding"
        _ = try await client.run(holding, ProcCommandView(path: "/bin/sh", args: ["-c", "echo held; exec sleep 60"]))
        let held = Collected()
        let first = Task { try await owner.readOutput(holding) { held.add($0) } }
        try await eventually("the first reader reading") { held.count > 0 }
        #expect(await apiCode { try await owner.readOutput(holding) { _ in } } == "busy")
        _ = try await client.signal(holding, "KILL")
        try await first.value
        #expect(held.bytes.withLock { $0 } == Array("held\n".utf8))

        // Other nodes do not relay the bytes: they redirect to the owner.
        let elsewhere = try await HTTPExchange.perform(.GET, "/v1/proc/stdout\(bulk)", to: cluster.members[leader].api)
        #expect(elsewhere.status == 307 && String(decoding: elsewhere.body, as: UTF8.self).contains(cluster.members[b].api))
        // Bad requests: no such element, not a process.
        #expect(await apiCode { try await owner.readOutput("/\(host)/none") { _ in } } == "not_found")
        try await client.makeChannel("/\(host)/ch", capacity: 1)
        #expect(await apiCode { try await owner.readOutput("/\(host)/ch") { _ in } } == "wrong_kind")

        // The CLI: mkproc reads the command as JSON; stdin writes and closes; stdout copies; waitall waits.
        let api = cluster.members[leader].api
        let path = "/\(host)/tr"
        let made = try await runCircuit(["mkproc", "--node", api, path], input: Array(#"{"path": "/usr/bin/tr", "args": ["a-z", "A-Z"]}"#.utf8))
        #expect(made.0 == 0, "\(made)")
        let fed = try await runCircuit(["stdin", "--node", api, path], input: Array("shout\n".utf8))
        #expect(fed.0 == 0, "\(fed)")
        let shown = try await runCircuit(["stdout", "--node", api, path])
        #expect(shown.0 == 0 && shown.1 == "SHOUT\n", "\(shown)")
        // stdin copies as it reads: a line reaches the process while the CLI's standard input (a pipe) is open.
        let live = "/\(host)/live"
        _ = try await client.run(live, ProcCommandView(path: "/bin/cat"))
        let liveOut = Collected()
        let liveReader = Task { try await owner.readOutput(live) { liveOut.add($0) } }
        let feeder = Pipe()
        let (cli, errors) = try startCircuit(["stdin", "--node", api, live], input: feeder)
        feeder.fileHandleForWriting.write(Data("first\n".utf8))
        try await eventually("the first line through while the CLI's input is open") { liveOut.count == 6 }
        #expect(cli.isRunning)
        feeder.fileHandleForWriting.write(Data("second\n".utf8))
        try feeder.fileHandleForWriting.close()
        try await eventually("the CLI ended with its input") { !cli.isRunning }
        #expect(cli.terminationStatus == 0, "\(errors())")
        try await liveReader.value
        #expect(liveOut.bytes.withLock { $0 } == Array("first\nsecond\n".utf8))
        // Refused while its input is open and silent (another client holds the process's stdin): the CLI ends at
        // once with the host's error, not at its input's next line.
        let heldStdin = "/\(host)/held-stdin"
        _ = try await client.run(heldStdin, ProcCommandView(path: "/bin/cat"))
        let heldOut = Collected()
        let heldReader = Task { try await owner.readOutput(heldStdin) { heldOut.add($0) } }
        let (holdingStdin, holder) = AsyncStream.makeStream(of: ByteBuffer.self)
        let holdingWriter = Task { try await asker.writeStdin(heldStdin, streaming: holdingStdin) }
        holder.yield(ByteBuffer(string: "x"))
        try await eventually("the first writer holds stdin") { heldOut.count == 1 }
        let silent = Pipe()
        let (refused, refusal) = try startCircuit(["stdin", "--node", api, heldStdin], input: silent)
        try await eventually("the CLI refused while its input is open") { !refused.isRunning }
        #expect(refused.terminationStatus != 0 && refusal().contains("being written by another client"), "\(refused.terminationStatus): \(refusal())")
        try silent.fileHandleForWriting.close()
        // With standard input closed (`<&-`), it says so and sends nothing (no descriptor it opens is read instead).
        let binary = try #require(circuitBinary())
        let closedInput = try await runCircuit(["-c", "exec \"$0\" stdin --node \(api) \(heldStdin) <&-", binary], shell: true)
        #expect(closedInput.0 == 2 && closedInput.2.contains("standard input is closed"), "\(closedInput)")
        holder.finish()
        #expect(try await holdingWriter.value.bytes == 1)
        try await heldReader.value
        let all = try await runCircuit(["waitall", "--node", api], input: Array("\(path)\n/\(host)/cat\n".utf8))
        #expect(all.0 == 0 && all.1.split(separator: "\n").count == 2, "\(all)")
        // runall: every live host runs it; each line comes tagged with its host; the elements are removed after.
        let everywhere = try await runCircuit(["runall", "--node", api, "/bin/sh", "-c", "echo hello; echo oops >&2"])
        let ids = (0..<3).map { cluster.members[$0].folder.hostID }.sorted()
        #expect(everywhere.0 == 0, "\(everywhere)")
        #expect(everywhere.1.split(separator: "\n").map(String.init).sorted() == ids.map { "\($0): hello" }, "\(everywhere)")
        #expect(everywhere.2.split(separator: "\n").map(String.init).sorted() == ids.map { "\($0): oops" }, "\(everywhere)")
        let failing = try await runCircuit(["runall", "--node", api, "/bin/sh", "-c", "exit 3"])
        #expect(failing.0 == 1 && failing.2.contains("exited with 3"), "\(failing)")
        // Ctrl-C: every host's process is removed before the CLI ends (130), none left running.
        func runallElements() async -> Int {
            var count = 0
            for id in ids { count += ((try? await client.list("/\(id)"))?.names ?? []).filter { $0.hasPrefix("runall-") }.count }
            return count
        }
        let sleeperInput = Pipe()
        let (sleepers, sleepersErrors) = try startCircuit(["runall", "--node", api, "/bin/sleep", "60"], input: sleeperInput)
        try await eventually("a runall process on every host", timeout: .seconds(20)) { await runallElements() == ids.count }
        kill(sleepers.processIdentifier, SIGINT)
        try await eventually("the interrupted runall ended", timeout: .seconds(20)) { !sleepers.isRunning }
        #expect(sleepers.terminationStatus == 130 && sleepersErrors().contains("interrupted"), "\(sleepers.terminationStatus): \(sleepersErrors())")
        #expect(await runallElements() == 0, "every host's process removed")
        let bad = try await runCircuit(["mkproc", "--node", api, "/\(host)/bad"], input: Array("{not json".utf8))
        #expect(bad.0 == 2 && bad.2.contains("not valid JSON"), "\(bad)")
        // A job's streams are its process's, under the host it runs on: the error says where.
        let jobStreams = try await runCircuit(["stdout", "--node", api, "/jobs/build"])
        #expect(jobStreams.0 != 0 && jobStreams.2.contains("/jobs/build is not under a host") && jobStreams.2.contains("/X<host>/jobs/build"), "\(jobStreams)")
    }
}

/// Starts the `circuit` executable with `input` as its standard input (the caller writes and closes it); answers the
/// process and a reader of what it wrote to standard error so far.
private func startCircuit(_ arguments: [String], input: Pipe) throws -> (Process, () -> String) {
    let errors = try temporaryFolder("circuit-stdin") + "/err"
    _ = FileManager.default.createFile(atPath: errors, contents: nil)
    let process = Process()
    process.executableURL = URL(fileURLWithPath: try #require(circuitBinary()))
    process.arguments = arguments
    process.standardInput = input
    process.standardOutput = FileHandle.nullDevice
    process.standardError = FileHandle(forWritingAtPath: errors)
    try process.run()
    return (process, { (try? String(contentsOfFile: errors, encoding: .utf8)) ?? "" })
}

/// Bytes waiting in the stdin pipe of the process `pid`, looked at through /proc without taking any; -1 if it cannot
/// be opened.
private func stdinHeld(_ pid: Int64) -> Int {
    let fd = open("/proc/\(pid)/fd/0", O_RDONLY | O_NONBLOCK)
    guard fd >= 0 else { return -1 }
    defer { close(fd) }
    var held: CInt = 0
    return ioctl(fd, UInt(FIONREAD), &held) == 0 ? Int(held) : -1
}

/// A plain HTTP client on a socket of its own: writes `bytes` into the stdin of `path` (left open) as a chunked
/// body it does not finish; answers the socket, which the caller closes (a FIN). Sends time out after 10 s.
private func startStdinRequest(to address: String, path: String, bytes: Int) throws -> CInt {
    let colon = try #require(address.lastIndex(of: ":"))
    let port = try #require(UInt16(address[address.index(after: colon)...]))
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var timeout = timeval(tv_sec: 10, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    var to = sockaddr_in()
    to.sin_family = sa_family_t(AF_INET)
    to.sin_port = port.bigEndian
    to.sin_addr.s_addr = inet_addr(String(address[..<colon]))
    let connected = withUnsafePointer(to: &to) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    try #require(connected == 0, "connect to \(address): \(String(cString: strerror(errno)))")
    var request = Array("POST /v1/proc/stdin\(path)?open=1 HTTP/1.1\r\nHost: \(address)\r\nTransfer-Encoding: chunked\r\n\r\n".utf8)
    let chunk = 1 << 18
    for _ in 0..<(bytes / chunk) {
        request += Array("\(String(chunk, radix: 16))\r\n".utf8) + [UInt8](repeating: 7, count: chunk) + Array("\r\n".utf8)
    }
    var sent = 0
    while sent < request.count {
        let n = request[sent...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
        try #require(n > 0, "sending the request: \(String(cString: strerror(errno)))")
        sent += n
    }
    return fd
}
