import ArgumentParser
import CircuitAPI
import CircuitClient
import CircuitNode
import Foundation

/// `circuit bench mount`: the file system against the CLI and the client library on the same 3-daemon cluster, in one
/// run: a process made, run and waited for (mkdir + run + waitexit through the mount, `circuit run` + `circuit wait`,
/// `run` + `wait` of the client library), and channel messages through the mount (a file opened, written and closed
/// per message; opened, read and closed per receive) beside the client library, for 64-byte and 1 MiB messages.
struct MountBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mount",
        abstract: "Process latency and channel throughput through a FUSE mount, beside the CLI and the client library.")

    @Option(help: "Seconds measured per throughput run.") var seconds: Double = 2
    @Option(help: "Rounds per throughput row.") var rounds: Int = 3
    @Option(help: "Processes timed per latency row.") var samples: Int = 20
    @Option(help: "Folder for the daemons' data and the mount point (default: a temporary folder).") var data: String?

    func run() async throws {
        let base = data ?? temporaryDirectory("circuit-bench-mount")
        let binary = URL(fileURLWithPath: CommandLine.arguments[0]).standardizedFileURL.path
        let daemons = try DaemonProcesses(binary: binary, base: base, count: 3, portRange: cliPortRange)
        try daemons.startAll()
        let mountpoint = "\(base)/mnt"
        let mount = Process()
        defer {
            if mount.isRunning {
                kill(mount.processIdentifier, SIGTERM)
                mount.waitUntilExit()
            }
            daemons.stopAll()
            if data == nil { try? FileManager.default.removeItem(atPath: base) }
        }
        let leader = try await daemons.leader()
        _ = try await daemons.allAlive()
        let api = daemons.members[leader].api
        mount.executableURL = URL(fileURLWithPath: binary)
        mount.arguments = ["mount", mountpoint, "--node", api]
        mount.standardError = FileHandle.nullDevice
        try mount.run()
        let host = daemons.members[(leader + 1) % 3].folder.hostID
        let dc = "\(mountpoint)/\(host)/dc"
        let deadline = ContinuousClock.now + .seconds(20)
        while !FileManager.default.fileExists(atPath: dc) {
            guard ContinuousClock.now < deadline, mount.isRunning else { throw ValidationError("the mount did not come up at \(mountpoint)") }
            try await Task.sleep(for: .milliseconds(20))
        }
        var client = daemons.client(leader)
        client.timeout = 60
        var rows: [(String, String, [Double])] = []

        // A process made, run and waited for, three ways.
        var viaMount: [Double] = [], viaCLI: [Double] = [], viaLibrary: [Double] = []
        for i in 0..<samples {
            viaMount.append(try await onThread { try Self.processThroughMount("\(dc)/proc/m\(i)") })
            let start = ContinuousClock.now
            for arguments in [["run", "--node", api, "/\(host)/c\(i)", "/bin/true"], ["wait", "--node", api, "/\(host)/c\(i)"]] {
                let cli = Process()
                cli.executableURL = URL(fileURLWithPath: binary)
                cli.arguments = arguments
                cli.standardOutput = FileHandle.nullDevice
                try cli.run()
                cli.waitUntilExit()
                guard cli.terminationStatus == 0 else { throw ValidationError("circuit \(arguments.joined(separator: " ")) failed") }
            }
            viaCLI.append((ContinuousClock.now - start).milliseconds)
            let t = ContinuousClock.now
            _ = try await client.run("/\(host)/l\(i)", ProcCommandView(path: "/bin/true"))
            _ = try await client.wait("/\(host)/l\(i)")
            viaLibrary.append((ContinuousClock.now - t).milliseconds)
        }
        rows.append(("process /bin/true through the mount: mkdir, write run, read waitexit", "ms", viaMount))
        rows.append(("the same through the CLI: circuit run, then circuit wait (two processes)", "ms", viaCLI))
        rows.append(("the same through the client library: run, then wait", "ms", viaLibrary))

        // Channel messages: the mount (a file per message) beside the library (a request per message).
        var serial = 0
        for (size, capacity, unit) in [(64, 64, "msg/s"), (1 << 20, 4, "MB/s")] {
            var mountRates: [Double] = [], libraryRates: [Double] = []
            for _ in 0..<rounds {
                serial += 1
                let name = "ch\(serial)"
                try await client.makeChannel("/\(host)/\(name)", capacity: UInt32(capacity))
                let n = try await Self.throughMount("\(dc)/chan/\(name)", size: size, seconds: seconds)
                mountRates.append(unit == "msg/s" ? Double(n) / seconds : Double(n * size) / seconds / 1e6)
                serial += 1
                try await client.makeChannel("/\(host)/ch\(serial)", capacity: UInt32(capacity))
                let chan = try await client.channel("/\(host)/ch\(serial)")
                let m = try await Self.throughLibrary(chan, size: size, seconds: seconds)
                libraryRates.append(unit == "msg/s" ? Double(m) / seconds : Double(m * size) / seconds / 1e6)
            }
            let label = size == 64 ? "64 B" : "1 MiB"
            rows.append(("channel, \(label) messages, capacity \(capacity), through the mount (open, write, close / open, read, close)", unit, mountRates))
            rows.append(("channel, \(label) messages, capacity \(capacity), through the client library (a request each)", unit, libraryRates))
        }

        print("Mount benchmark: 3 daemons on loopback, a `circuit mount` process speaking to the leader, elements on a follower; medians of \(rounds) rounds of \(seconds) s (latency: \(samples) samples)")
        print("")
        printMedianTable(rows)
        print("")
        print(String(format: "Process latency, mount / CLI: %.2f; mount / library: %.2f. Channel through the mount / library: 64 B %.2f, 1 MiB %.2f.",
            median(viaMount) / median(viaCLI), median(viaMount) / median(viaLibrary),
            median(rows[3].2) / median(rows[4].2), median(rows[5].2) / median(rows[6].2)))
    }

    /// mkdir, write the command to run, read waitexit to its end; milliseconds.
    static func processThroughMount(_ dir: String) throws -> Double {
        let start = ContinuousClock.now
        guard mkdir(dir, 0o755) == 0 else { throw ValidationError("mkdir \(dir): \(String(cString: strerror(errno)))") }
        try writeFile("\(dir)/run", Array(#"{"path": "/bin/true"}"#.utf8))
        let exit = try readFile("\(dir)/waitexit")
        guard String(decoding: exit, as: UTF8.self).contains("\"exited\"") else { throw ValidationError("\(dir): \(exit)") }
        return (ContinuousClock.now - start).milliseconds
    }

    static func writeFile(_ path: String, _ bytes: [UInt8]) throws {
        let fd = open(path, O_WRONLY)
        guard fd >= 0 else { throw ValidationError("open \(path): \(String(cString: strerror(errno)))") }
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        let closed = close(fd)
        guard written == bytes.count, closed == 0 else { throw ValidationError("write \(path): \(String(cString: strerror(errno)))") }
    }

    static func readFile(_ path: String, chunk: Int = 1 << 20 + 4096) throws -> [UInt8] {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw ValidationError("open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: chunk)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            guard n >= 0 else { throw ValidationError("read \(path): \(String(cString: strerror(errno)))") }
            if n == 0 { return out }
            out += buffer[0..<n]
        }
    }

    /// Messages received in `seconds` by a receiving thread while a sending thread sends through the mount.
    static func throughMount(_ dir: String, size: Int, seconds: Double) async throws -> Int {
        let message = [UInt8](repeating: 0x61, count: size)
        let end = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
        let received = Counter()
        let receiverDone = Counter()
        // The sender goes on until the receiver has stopped (a receive begun just before the end gets its message);
        // its last send may then wait for room, which the drain below makes.
        async let sender: Void = onThread {
            while receiverDone.value == 0 { try writeFile("\(dir)/send", message) }
        }
        try await onThread {
            defer { receiverDone.add(1) }
            while ContinuousClock.now < end {
                let got = try readFile("\(dir)/recv")
                guard got.count == size else { throw ValidationError("received \(got.count) bytes, not \(size)") }
                received.add(1)
            }
        }
        // Drain so the sender's last send returns.
        let drain = Task {
            while !Task.isCancelled {
                if (try? await onThread({ try readFile("\(dir)/tryrecv") })) == nil { try? await Task.sleep(for: .milliseconds(1)) }
            }
        }
        try await sender
        drain.cancel()
        return received.value
    }

    static func throughLibrary(_ chan: Chan, size: Int, seconds: Double) async throws -> Int {
        let message = [UInt8](repeating: 0x61, count: size)
        let end = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
        let receiverDone = Counter()
        async let sender: Void = {
            do {
                while receiverDone.value == 0 { try await chan.send(message) }
            } catch {
                throw error
            }
        }()
        var received = 0
        while ContinuousClock.now < end {
            guard try await chan.receive().count == size else { throw ValidationError("a short message") }
            received += 1
        }
        receiverDone.add(1)
        // Drain until the sender's last send has returned (it may be waiting for room).
        let drain = Task {
            while !Task.isCancelled {
                if (try? await chan.tryReceive()) == nil { try? await Task.sleep(for: .milliseconds(1)) }
            }
        }
        try await sender
        drain.cancel()
        return received
    }
}
