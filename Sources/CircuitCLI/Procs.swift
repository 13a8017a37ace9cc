import ArgumentParser
import CircuitAPI
import CircuitClient
import Foundation

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
        try options.emit(w) { "\(w.path ?? path) created at revision \(w.revision)" }
    }
}

/// `circuit stdin`: all of standard input into the process's stdin, which is then closed.
struct Stdin: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Write standard input into a process's stdin, then close it.")
    @OptionGroup var options: ClientOptions
    @Flag(help: "Leave the process's stdin open for another write.") var keepOpen = false
    @Argument(help: "The process: /X<host id>/name") var path: String

    func run() async throws {
        let bytes = [UInt8](FileHandle.standardInput.readDataToEndOfFile())
        var client = options.client
        client.timeout = 7 * 24 * 3600
        let written = try await client.owner(of: path).writeStdin(path, bytes, keepOpen: keepOpen)
        if options.json { try ClientOptions.printJSON(written) }
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
