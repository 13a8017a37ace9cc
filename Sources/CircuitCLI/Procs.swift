import ArgumentParser
import CircuitAPI
import CStandardStreams
import CircuitClient
import Foundation
import UnixSignals
import NIOCore
import NIOPosix
import Synchronization

/// `circuit mkproc`: the Go circuit's verb, the command as JSON on standard input.
struct Mkproc: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a process from a JSON command on standard input: {\"path\": \"/bin/ls\", \"args\": [...], \"env\": [...], \"dir\": \"...\"}.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "Where: /X<host id>/name") var path: String

    func run() async throws {
        let input = FileHandle.standardInput.readDataToEndOfFile()
        let command: ProcCommandView
        do {
            command = try JSONDecoder().decode(ProcCommandView.self, from: input)
        } catch {
            throw ValidationError("the command on standard input is not valid JSON of the form {\"path\": \"/bin/ls\", \"args\": [\"-l\"]}: \(error)")
        }
        let w = try await options.client.run(path, command)
        try options.emitCreated(w, path)
    }
}

/// `circuit stdin`: standard input into the process's stdin as it comes (a pipe's bytes are written as they are
/// read, not gathered until its end), which is then closed.
struct Stdin: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Copy standard input into a process's stdin as it comes, then close it.")
    @OptionGroup var options: ClientOptions
    @Flag(help: "Leave the process's stdin open for another write.") var keepOpen = false
    @Argument(help: "The process: /X<host id>/name") var path: String

    func run() async throws {
        // Closed, it was opened onto /dev/null at the start (CStandardStreams): say so rather than write nothing.
        guard circuit_standard_streams_closed_at_start() & 1 == 0 else {
            throw ValidationError("standard input is closed: give it /dev/null to close the process's stdin with nothing written")
        }
        var client = options.client
        client.timeout = 7 * 24 * 3600
        let written = try await client.writeStdin(path, streaming: StandardInputChunks(), keepOpen: keepOpen)
        if options.json { try ClientOptions.printJSON(written) }
    }
}

/// Standard input in chunks as it comes: what a pipe holds (up to a MiB), a file a MiB at a time. Each read runs on
/// NIO's thread pool, so a read that waits (a pipe with nothing yet) holds none of the tasks' threads; a cancelled
/// task (the host refused the stream midway) wakes its read at once. A read of less than half a MiB is copied into a
/// buffer of its size: chunks on their way hold their bytes, not a MiB each.
struct StandardInputChunks: AsyncSequence, Sendable {
    typealias Element = ByteBuffer
    static let largest = 1 << 20

    struct ReadFailed: Error, CustomStringConvertible {
        let errno: Int32
        var description: String { "reading standard input: \(String(cString: strerror(errno)))" }
    }

    /// A pipe that wakes a read waiting in `poll`, written once its task is cancelled.
    final class Wake: Sendable {
        let readEnd: CInt
        let writeEnd: CInt

        init() {
            var pair: [CInt] = [-1, -1]
            _ = pipe(&pair)
            (readEnd, writeEnd) = (pair[0], pair[1])
        }

        func ring() {
            var byte: UInt8 = 1
            _ = Glibc.write(writeEnd, &byte, 1)
        }

        deinit {
            close(readEnd)
            close(writeEnd)
        }
    }

    struct AsyncIterator: AsyncIteratorProtocol {
        private var ended = false
        private let wake = Wake()

        mutating func next() async throws -> ByteBuffer? {
            if ended { return nil }
            let wake = self.wake
            let chunk = try await withTaskCancellationHandler {
                try await NIOThreadPool.singleton.runIfActive { try StandardInputChunks.read(wake: wake.readEnd) }
            } onCancel: {
                wake.ring()
            }
            if chunk == nil { ended = true }
            return chunk
        }
    }

    func makeAsyncIterator() -> AsyncIterator { AsyncIterator() }

    /// One read of standard input once it has something (or its end); nil at its end. `wake` readable: cancelled.
    static func read(wake: CInt) throws -> ByteBuffer? {
        while true {
            var ready = [pollfd(fd: STDIN_FILENO, events: Int16(POLLIN), revents: 0), pollfd(fd: wake, events: Int16(POLLIN), revents: 0)]
            if poll(&ready, 2, -1) < 0 {
                if errno == EINTR { continue }
                throw ReadFailed(errno: errno)
            }
            if ready[1].revents != 0 { throw CancellationError() }
            if ready[0].revents == 0 { continue }
            var buffer = ByteBuffer()
            var failure: Int32 = 0
            let count = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: largest) { space -> Int in
                let n = Glibc.read(STDIN_FILENO, space.baseAddress, space.count)
                if n < 0 { failure = errno }
                return Swift.max(n, 0)
            }
            switch failure {
            case 0: break
            case EINTR, EAGAIN: continue  // EAGAIN: a descriptor left non-blocking by whoever gave it
            default: throw ReadFailed(errno: failure)
            }
            if count == 0 { return nil }
            return count < largest / 2 ? ByteBuffer(bytes: buffer.readableBytesView) : buffer
        }
    }
}

/// `circuit stdout` and `circuit stderr`: the stream, as it comes, to standard output.
struct Stdout: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Copy a process's stdout to standard output until the process closes it.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The process: /X<host id>/name") var path: String

    func run() async throws { try await copyOutput(options, path, "stdout") }
}

struct Stderr: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Copy a process's stderr to standard output until the process closes it.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The process: /X<host id>/name") var path: String

    func run() async throws { try await copyOutput(options, path, "stderr") }
}

private func copyOutput(_ options: ClientOptions, _ path: String, _ stream: String) async throws {
    try await options.client.owner(of: path).readOutput(path, stream: stream) { chunk in
        FileHandle.standardOutput.write(Data(chunk))
    }
}

/// `circuit scrub`: removes the element; a process is stopped first.
struct Scrub: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove the element at a path: a process is killed (its group), a channel's waiters fail with gone.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The element: /X<host id>/name") var path: String

    func run() async throws {
        let w = try await options.client.remove(element: path)
        try options.emit(w) { "removed \(path) at revision \(w.revision)" }
    }
}

/// `circuit waitall`: the Go circuit's verb, paths on standard input.
struct Waitall: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Wait for every process named on standard input (one path a line); print their final states (JSON lines); exit 1 unless all exited 0.")
    @OptionGroup var options: ClientOptions

    func run() async throws {
        let paths = String(decoding: FileHandle.standardInput.readDataToEndOfFile(), as: UTF8.self)
            .split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        var waiting = options.client
        waiting.timeout = 7 * 24 * 3600
        let client = waiting
        let ended = try await withThrowingTaskGroup(of: ElementView.self) { group in
            for path in paths { group.addTask { try await client.wait(path) } }
            var out: [ElementView] = []
            for try await view in group { out.append(view) }
            return out.sorted { ($0.path ?? "") < ($1.path ?? "") }
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        for view in ended { print(String(decoding: try encoder.encode(view), as: UTF8.self)) }
        if ended.contains(where: { $0.phase != "exited" || $0.exitCode != 0 }) { Foundation.exit(1) }
    }
}

/// `circuit runall`: one command on every live host, its output tagged line by line with the host.
struct Runall: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run PROGRAM on every live host; print each line of its output as \"X<host>: line\" (stderr lines to stderr); exit 1 unless every host's run exited 0.")
    @OptionGroup var options: ClientOptions
    @Option(help: "Working directory on each host.") var dir: String?
    @Option(help: "An environment variable, NAME=VALUE (repeatable; none given: each daemon's environment).") var env: [String] = []
    @Argument(parsing: .captureForPassthrough, help: "The program (an absolute path) and its arguments.") var command: [String]

    func validate() throws {
        guard let program = command.first, program.hasPrefix("/") else { throw ValidationError("give the program as an absolute path") }
    }

    /// How one host's run went: its process's end, and what of its output could not be read.
    private enum Outcome: Sendable {
        case ended(ElementView, unread: [String])
        case failed(String)
    }

    func run() async throws {
        var waiting = options.client
        waiting.timeout = 7 * 24 * 3600
        let client = waiting
        // Removing the processes at the end (or after Ctrl-C) must not wait for a host that is gone.
        var removing = options.client
        removing.timeout = 10
        let cleaner = removing
        let hosts = try await client.members().filter { $0.state == "alive" }.map(\.id).sorted()
        let run = "runall-" + String(UInt64(Date().timeIntervalSince1970 * 1000), radix: 36) + String(UInt32.random(in: 0...UInt32.max), radix: 36)
        let cmd = ProcCommandView(path: command[0], args: Array(command.dropFirst()), env: env, dir: dir ?? "")
        let out = TaggedOutput()
        let work = Task {
            await withTaskGroup(of: (String, Outcome).self) { group in
                for host in hosts {
                    group.addTask { (host, await Self.run(cmd, at: "/\(host)/\(run)", host: host, client, cleaner, out)) }
                }
                var all: [(String, Outcome)] = []
                for await r in group { all.append(r) }
                return all
            }
        }
        // Ctrl-C (or SIGTERM): every host's run is cut short, and its process removed, before the CLI ends.
        let interrupted = Atomic(false)
        let signals = Task {
            for await _ in await UnixSignalsSequence(trapping: [.sigint, .sigterm]) {
                interrupted.store(true, ordering: .relaxed)
                work.cancel()
                break
            }
        }
        let results = await work.value
        signals.cancel()
        if interrupted.load(ordering: .relaxed) {
            FileHandle.standardError.write(Data("circuit: interrupted; each host's process was removed (where its host answered)\n".utf8))
            Foundation.exit(130)
        }
        var failed = false
        for (host, outcome) in results.sorted(by: { $0.0 < $1.0 }) {
            var problems: [String] = []
            switch outcome {
            case .failed(let why):
                problems.append(why)
            case .ended(let view, let unread):
                problems += unread
                if view.phase != "exited" || view.exitCode != 0 {
                    problems.append("\(view.phase ?? "?") \(view.phase == "signaled" ? "by signal \(view.signal ?? 0)" : "with \(view.exitCode ?? 0)")")
                }
            }
            for problem in problems { FileHandle.standardError.write(Data("circuit: \(host): \(problem)\n".utf8)) }
            failed = failed || !problems.isEmpty
        }
        if failed { Foundation.exit(1) }
    }

    /// One host's run: starts the process, copies its output (both streams to their ends), waits for it and removes
    /// it, whatever failed on the way (removal through `cleaner`, which a cancelled run does not cancel).
    private static func run(
        _ cmd: ProcCommandView, at path: String, host: String, _ client: CircuitClient, _ cleaner: CircuitClient, _ out: TaggedOutput
    ) async -> Outcome {
        let proc = client.makeProc(at: path)
        func remove() async { await Task.detached { _ = try? await cleaner.makeProc(at: path).scrub() }.value }
        do {
            try await proc.start(cmd)
        } catch {
            await remove()  // it may have been made before the answer was lost
            return .failed("could not start: \(error)")
        }
        func copy(_ stream: String) async -> String? {
            do {
                try await proc.read(stream) { out.write(host, $0, error: stream == "stderr") }
                return nil
            } catch {
                return "its \(stream) could not be read to its end: \(error)"
            }
        }
        async let stdout = copy("stdout")
        async let stderr = copy("stderr")
        let unread = [await stdout, await stderr].compactMap { $0 }
        out.flush(host)
        let ended: ElementView
        do {
            ended = try await proc.wait()
        } catch {
            await remove()
            return .failed("could not wait for it: \(error)")
        }
        await remove()
        return .ended(ended, unread: unread)
    }
}

/// Lines of several hosts' output, each written whole with its host in front.
private final class TaggedOutput: Sendable {
    private let partial = Mutex<[String: [UInt8]]>([:])

    func write(_ host: String, _ chunk: [UInt8], error: Bool) {
        let key = host + (error ? "/err" : "/out")
        partial.withLock { p in
            var pending = (p[key] ?? []) + chunk
            var lines: [[UInt8]] = []
            while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                lines.append(Array(pending[...newline]))
                pending.removeSubrange(...newline)
            }
            p[key] = pending
            // Written under the lock: lines of different hosts never interleave.
            let handle = error ? FileHandle.standardError : FileHandle.standardOutput
            for line in lines { handle.write(Data(Array("\(host): ".utf8) + line)) }
        }
    }

    /// The last line of a host's output, if it had no newline.
    func flush(_ host: String) {
        partial.withLock { p in
            for (suffix, handle) in [("/out", FileHandle.standardOutput), ("/err", FileHandle.standardError)] {
                if let rest = p[host + suffix], !rest.isEmpty { handle.write(Data(Array("\(host): ".utf8) + rest + [UInt8(ascii: "\n")])) }
                p[host + suffix] = nil
            }
        }
    }
}
