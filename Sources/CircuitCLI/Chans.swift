import ArgumentParser
import CircuitAPI
import CircuitClient
import Foundation

/// `circuit mkchan`: a channel element; its buffer lives on the host named in its path.
struct Mkchan: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a channel at /X<host>/name holding up to CAPACITY messages (0: each send waits for its receiver).")
    @OptionGroup var options: ClientOptions
    @Argument(help: "Where: /X<host id>/name") var path: String
    @Argument(help: "How many messages it holds.") var capacity: UInt32 = 0

    func run() async throws {
        let w = try await options.client.makeChannel(path, capacity: capacity)
        try options.emitCreated(w, path)
    }
}

/// `circuit mk@join` and `circuit mk@leave`: membership subscriptions, read with `circuit recv`.
struct MkJoin: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mk@join",
        abstract: "Create a subscription at /X<host>/name that receives every live host's path, then each host that joins (read it with recv).")
    @OptionGroup var options: ClientOptions
    @Argument(help: "Where: /X<host id>/name") var path: String

    func run() async throws {
        let w = try await options.client.makeSubscription(path, events: "join")
        try options.emitCreated(w, path)
    }
}

struct MkLeave: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mk@leave",
        abstract: "Create a subscription at /X<host>/name that receives the path of each host that leaves or expires (read it with recv).")
    @OptionGroup var options: ClientOptions
    @Argument(help: "Where: /X<host id>/name") var path: String

    func run() async throws {
        let w = try await options.client.makeSubscription(path, events: "leave")
        try options.emitCreated(w, path)
    }
}

/// `circuit send`: all of standard input as one message.
struct Send: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Send all of standard input as one message; wait until it is buffered or received.")
    @OptionGroup var options: ClientOptions
    @Flag(name: .customLong("try"), help: "Fail at once (exit 1, would_block) instead of waiting.") var tryOnly = false
    @Argument(help: "The channel: /X<host id>/name") var path: String

    func run() async throws {
        let message = [UInt8](FileHandle.standardInput.readDataToEndOfFile())
        var client = options.client
        client.timeout = 7 * 24 * 3600
        let chan = try await client.channel(path)
        let stat = tryOnly ? try await chan.trySend(message) : try await chan.send(message)
        if options.json { try ClientOptions.printJSON(stat) }
    }
}

/// `circuit recv`: one message, to standard output as it came.
struct Recv: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Receive one message and write it to standard output; exit 1 (closed) once the channel is closed and empty.")
    @OptionGroup var options: ClientOptions
    @Flag(name: .customLong("try"), help: "Fail at once (exit 1, would_block) instead of waiting.") var tryOnly = false
    @Argument(help: "The channel: /X<host id>/name") var path: String

    func run() async throws {
        var client = options.client
        client.timeout = 7 * 24 * 3600
        let chan = try await client.channel(path)
        let message = tryOnly ? try await chan.tryReceive() : try await chan.receive()
        FileHandle.standardOutput.write(Data(message))
    }
}

/// `circuit close`: what the channel holds is still received; then receives report it closed.
struct Close: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Close a channel: what it holds is still delivered, then receives fail with closed.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The channel: /X<host id>/name") var path: String

    func run() async throws {
        let stat = try await options.client.channel(path).close()
        try options.emit(stat) { "closed \(path) (\(stat.buffered) messages still held)" }
    }
}

/// `circuit stat`: a channel as its host holds it.
struct Stat: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show a channel as its host holds it: capacity, closed, buffered, sends, receives, waiting senders and receivers.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The channel: /X<host id>/name") var path: String

    func run() async throws {
        let s = try await options.client.channel(path).stat()
        try options.emit(s) {
            "\(s.path): capacity \(s.capacity), \(s.closed ? "closed" : "open"), \(s.buffered) buffered, \(s.sends) sent, "
                + "\(s.receives) received, \(s.waitingSenders) senders and \(s.waitingReceivers) receivers waiting"
        }
    }
}

/// `circuit mksel` and `circuit select`: a select's clauses, then a wait for one of them.
struct Mksel: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a select at /X<host>/name: CLAUSES is a JSON array of {\"op\": \"recv\"|\"send\"|\"wait\"|\"default\", \"chan\", \"created\", \"message\", \"proc\"}.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "Where: /X<host id>/name") var path: String
    @Argument(help: "The clauses (JSON); - reads them from standard input.") var clauses: String

    func run() async throws {
        let text = clauses == "-" ? String(decoding: FileHandle.standardInput.readDataToEndOfFile(), as: UTF8.self) : clauses
        let parsed: [SelectClauseView]
        do {
            parsed = try JSONDecoder().decode([SelectClauseView].self, from: Data(text.utf8))
        } catch {
            throw ValidationError("the clauses are not a JSON array of {\"op\": ..., \"chan\": ...}: \(error)")
        }
        let w = try await options.client.makeSelect(path, clauses: parsed)
        try options.emitCreated(w, path)
    }
}

struct SelectWait: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "select", abstract: "Wait until exactly one clause of a select fires; print which and what it brought (JSON).")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The select: /X<host id>/name") var path: String

    func run() async throws {
        var client = options.client
        client.timeout = 7 * 24 * 3600
        let outcome = try await client.select(path)
        try ClientOptions.printJSON(outcome)
        if outcome.error != nil { Foundation.exit(1) }
    }
}
