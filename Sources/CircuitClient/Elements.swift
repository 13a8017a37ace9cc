import CircuitAPI
import Foundation

/// The slides' interface: elements made at a path, then used through a handle that talks to their host.
extension CircuitClient {
    /// Creates a channel at `path` (under `/X<host>`) and answers its handle, which speaks to its host directly.
    public func makeChan(at path: String, capacity: Int) async throws(CircuitClientError) -> Chan {
        guard capacity >= 0, capacity <= Int(UInt32.max) else { throw .api(.badRequest("a channel's capacity is 0 to \(UInt32.max), not \(capacity)")) }
        try await makeChannel(path, capacity: UInt32(capacity))
        return try await channel(path)
    }

    /// A process handle at `path` (under `/X<host>`, or under `/jobs` for a job the leader places); nothing runs
    /// until `start`.
    public func makeProc(at path: String) -> Proc { Proc(path: Self.rooted(path), client: self) }

    /// A select handle at `path` (under `/X<host>`); nothing waits until `start` and `wait`.
    public func makeSelect(at path: String) -> Select { Select(path: Self.rooted(path), client: self) }
}

/// A process (or a job), as in the slides: `start`, then `wait`; `signal`, its streams, `scrub`.
public struct Proc: Sendable {
    public let path: String
    public let client: CircuitClient

    /// Creates the element with its command: its host starts it (a job: the leader places it first).
    @discardableResult
    public func start(_ command: ProcCommandView, maxAttempts: UInt32? = nil) async throws(CircuitClientError) -> WriteView {
        try await client.run(path, command, maxAttempts: maxAttempts)
    }

    /// Waits until it has ended; answers its final state.
    public func wait() async throws(CircuitClientError) -> ElementView {
        var waiting = client
        waiting.timeout = max(client.timeout, 7 * 24 * 3600)
        return try await waiting.wait(path)
    }

    public func peek() async throws(CircuitClientError) -> ElementView { try await client.peek(path) }

    @discardableResult
    public func signal(_ signal: String) async throws(CircuitClientError) -> ElementView { try await client.signal(path, signal) }

    /// Writes into its stdin at its host (then closes it, unless `keepOpen`).
    @discardableResult
    public func writeStdin(_ bytes: [UInt8], keepOpen: Bool = false) async throws(CircuitClientError) -> StdinView {
        try await client.owner(of: path).writeStdin(path, bytes, keepOpen: keepOpen)
    }

    /// Reads its `stdout` or `stderr` at its host, chunk by chunk, until it closes it.
    public func read(_ stream: String = "stdout", chunk: ([UInt8]) async throws -> Void) async throws(CircuitClientError) {
        try await client.owner(of: path).readOutput(path, stream: stream, chunk: chunk)
    }

    /// Removes the element: its host stops the process (SIGTERM, then SIGKILL after a grace period).
    @discardableResult
    public func scrub() async throws(CircuitClientError) -> WriteView { try await client.remove(element: path) }
}

/// A select, as in the slides: `start` with the clauses, then `wait` for the one that fires.
public struct Select: Sendable {
    public let path: String
    public let client: CircuitClient

    /// Creates the select element with its clauses (docs/selects.md).
    @discardableResult
    public func start(_ clauses: [SelectClauseView]) async throws(CircuitClientError) -> WriteView {
        try await client.makeSelect(path, clauses: clauses)
    }

    /// Waits until exactly one clause fires.
    public func wait() async throws(CircuitClientError) -> SelectOutcomeView {
        var waiting = client
        waiting.timeout = max(client.timeout, 7 * 24 * 3600)
        return try await waiting.select(path)
    }
}

extension Chan {
    /// The slides' name for `receive`.
    public func recv() async throws(CircuitClientError) -> [UInt8] { try await receive() }
}
