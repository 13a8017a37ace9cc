import CircuitAPI
import Foundation
import NIOCore

extension CircuitClient {
    /// Creates a process element at `path` (under `/X<host>`): that host starts it and reports its phases. Under
    /// `/jobs`, a fault-tolerant job instead: the leader places it on a live host and places it again on another if
    /// that host is lost before it ends, up to `maxAttempts` placements (at least once).
    public func run(_ path: String, _ command: ProcCommandView, maxAttempts: UInt32? = nil) async throws(CircuitClientError) -> WriteView {
        var view = ElementView(kind: Self.rooted(path).hasPrefix("/jobs/") ? "job" : "proc")
        view.command = command
        view.maxAttempts = maxAttempts
        return try await create(path, view)
    }

    /// Waits until the process at `path` has ended (exited, signaled or lost) and answers its final state. Give the
    /// client a `timeout` as long as you are willing to wait.
    public func wait(_ path: String) async throws(CircuitClientError) -> ElementView {
        try await call("GET", "/v1/wait" + Self.rooted(path), ownConnection: true)
    }

    /// Sends `signal` (a name such as TERM or KILL, or a number) to the process at `path`, through its owning host.
    public func signal(_ path: String, _ signal: String) async throws(CircuitClientError) -> ElementView {
        try await call("POST", "/v1/signal" + Self.rooted(path), query: ["signal": signal])
    }

    /// Streams the process's `stdout` or `stderr` (one reader at a time) from its host, chunk by chunk, until the
    /// process closes it: each chunk is asked for only after `chunk` returned. Best asked of the owning host
    /// (`owner(of:)`); another node names it (307), and it is asked then.
    public func readOutput(
        _ path: String, stream: String = "stdout", chunk: ([UInt8]) async throws -> Void
    ) async throws(CircuitClientError) {
        guard let endpoint = endpoints.first else { throw .unreachable(endpoints: [], why: "no endpoints given") }
        let answer: (status: Int, errorBody: [UInt8])
        do {
            answer = try await HTTPExchange.streamChunks(.GET, "/v1/proc/\(stream)" + Self.rooted(path), to: endpoint, tls: tls, chunk: chunk)
        } catch {
            throw .unreachable(endpoints: [endpoint], why: "\(error)")
        }
        if answer.status != 200 { throw Self.apiError(status: answer.status, body: answer.errorBody) }
    }

    /// Writes `bytes` into the process's stdin at its host, then closes stdin unless `keepOpen`. Ask the owning
    /// host (`owner(of:)`).
    @discardableResult
    public func writeStdin(_ path: String, _ bytes: [UInt8], keepOpen: Bool = false) async throws(CircuitClientError) -> StdinView {
        try await call(
            "POST", "/v1/proc/stdin" + Self.rooted(path), query: keepOpen ? ["open": "1"] : [:], bytes: bytes,
            ownConnection: true)
    }

    /// Writes each chunk of `chunks`, in order, into the process's stdin at its host (found through this client's
    /// nodes), in one request that lasts as long as the sequence: a producer whose bytes are not all there up front
    /// (a pipe, a file read in pieces) is written as it produces, and nothing is gathered in memory. Back-pressure
    /// reaches the producer: the next chunk is taken while less than 8 MiB (`HTTPExchange.streamingWindow`) of those
    /// before it are on their way, and the host writes into the pipe only as fast as the process reads. When the
    /// sequence ends, stdin is closed unless `keepOpen`.
    ///
    /// A refusal (no such process, another writer, the process closed its stdin) ends the call with that error,
    /// as a `CircuitClientError`; its sequence's task is cancelled then (one that does not heed cancellation holds the
    /// call until its next chunk). An error the sequence throws ends the request cleanly, as if the sequence had
    /// ended there (what came before it is written, and stdin is closed unless `keepOpen`), and is thrown as it is.
    @discardableResult
    public func writeStdin<Chunks: AsyncSequence & Sendable>(
        _ path: String, streaming chunks: Chunks, keepOpen: Bool = false
    ) async throws -> StdinView where Chunks.Element == ByteBuffer {
        let owner = try await owner(of: path)
        guard let endpoint = owner.endpoints.first else { throw CircuitClientError.unreachable(endpoints: [], why: "no endpoints given") }
        let uri = "/v1/proc/stdin" + Self.escape(path: Self.rooted(path)) + (keepOpen ? "?open=1" : "")
        let answer = try await Self.streamedRequest(uri, to: endpoint, tls: tls, chunks) { [$0] }
        if answer.status != 200 { throw Self.apiError(status: answer.status, body: answer.body) }
        do {
            return try JSONDecoder().decode(StdinView.self, from: Data(answer.body))
        } catch {
            throw CircuitClientError.badAnswer("\(error)")
        }
    }

    /// Used by the owning host: reports a process's new state.
    public func reportProc(_ path: String, _ state: ProcStateView) async throws(CircuitClientError) -> WriteView {
        let body: Data
        do { body = try JSONEncoder().encode(state) } catch { throw .badAnswer("\(error)") }
        return try await call("PUT", "/v1/proc-state" + Self.rooted(path), body: body)
    }
}
