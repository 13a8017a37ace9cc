import CircuitAPI
import CircuitStateMachine
import Foundation
import HTTPTypes
import Hummingbird
import NIOCore

/// A process's standard streams over HTTP, served only by the host that runs it: `GET /v1/proc/stdout/PATH` and
/// `GET /v1/proc/stderr/PATH` stream what the process writes until it closes the stream; `POST /v1/proc/stdin/PATH`
/// streams the request's body into its stdin, then closes stdin (unless `open=1`). Any other node answers 307 with
/// the owning host's address: the bytes never pass through a third host.
struct StdioRoutes: RouterMiddleware {
    typealias Context = APIContext
    let runtime: HostRuntime
    /// A live host's client address.
    let ownerAddress: @Sendable (String) async throws -> String?
    /// How long a request for a pending process's stream waits for its start.
    static let startWait: Duration = .seconds(10)

    func handle(
        _ request: Request, context: Context, next: (Request, Context) async throws -> Response
    ) async throws -> Response {
        guard let (stream, path) = try OwnerRouting.operation(request, under: "/v1/proc/") else { return try await next(request, context) }
        guard ["stdin", "stdout", "stderr"].contains(stream) else {
            throw APIError(status: 404, code: "not_found", message: "no such stream \(stream.debugDescription) (stdin, stdout, stderr)")
        }
        let expected: HTTPRequest.Method = stream == "stdin" ? .post : .get
        guard request.method == expected else {
            throw APIError(status: 405, code: "method_not_allowed", message: "\(stream) is \(expected.rawValue) /v1/proc/\(stream)/PATH")
        }
        if let error = Names.validate(path) { throw APIError.from(error) }
        guard let owner = Names.host(of: path) else {
            throw APIError.badRequest("\(path) is not under a host: a process runs on the host that owns it")
        }
        if owner != runtime.hostID { return try await OwnerRouting.redirect(request, owner: owner, path: path, ownerAddress: ownerAddress) }
        let io = try await streams(path)
        if stream == "stdin" { return try await write(request, to: io.stdin, path: path, connection: context.channel) }
        let body = try Self.reading(io.output(stream)!, until: request.body, path: path, stream: stream)
        return Response(status: .ok, headers: [.contentType: "application/octet-stream", .connection: "close"], body: body)
    }

    /// The process's streams on this host; waits a little for a pending one to start.
    private func streams(_ path: String) async throws -> ProcIO {
        guard let view = try await HostRuntime.peekIfPresent(path, at: runtime.api) else { throw APIError.from(.notFound(path: path)) }
        guard view.kind == "proc" else { throw APIError.from(.wrongKind(path: path, expected: "proc", actual: view.kind)) }
        let wait = view.phase == "pending" ? Self.startWait : .zero
        guard let io = await runtime.procs.io(path, createRevision: view.createRevision, timeout: wait) else {
            throw APIError(
                status: 409, code: "not_running",
                message: "this host (\(runtime.hostID)) holds no streams of \(path) (phase \(view.phase ?? "?")): it was not started by this daemon")
        }
        return io
    }

    /// The body of a read of `output`: holds it from now until the body ends or is dropped unwritten. `inbound`: the
    /// request's body, whose end (the client hung up) ends the read.
    static func reading(_ output: ProcOutput, until inbound: RequestBody, path: String, stream: String) throws(APIError) -> ResponseBody {
        guard output.acquire() else {
            throw APIError(status: 409, code: "busy", message: "the \(stream) of \(path) is being read by another client: one reader at a time")
        }
        // Given back when the body ends, or when it is dropped unwritten (the client went away before the head
        // went out): else the stream would stay busy for every later reader.
        let hold = ReleaseOnce { output.release() }
        return ResponseBody { writer in
            defer { hold.release() }
            do {
                // A client that hangs up ends the read at once, even while the process writes nothing.
                try await inbound.consumeWithCancellationOnInboundClose { _ in
                    while let chunks = await output.next() {
                        do {
                            try await writer.write(contentsOf: chunks)
                        } catch {
                            output.unread(chunks)  // the next reader gets them
                            throw error
                        }
                    }
                }
            } catch is CancellationError {
                return
            }
            try await writer.finish(nil)
        }
    }

    private func write(_ request: Request, to input: ProcInput, path: String, connection: any Channel) async throws -> Response {
        do {
            try input.acquire()
        } catch .busy {
            throw APIError(status: 409, code: "busy", message: "the stdin of \(path) is being written by another client: one writer at a time")
        } catch {
            throw APIError(status: 409, code: "closed", message: "the stdin of \(path) is closed")
        }
        let keepOpen = request.uri.queryParameters.get("open") == "1"
        var written = 0
        var body = request.body.makeAsyncIterator()
        while true {
            let next: ByteBuffer?
            do {
                next = try await body.next()
            } catch {
                // The client went away midway (or its body was malformed): stdin stays as it asked.
                input.finish(keepOpen: keepOpen)
                throw APIError.badRequest("the request's body ended early, after \(written) bytes went into the stdin of \(path): \(error)")
            }
            guard let chunk = next else { break }
            do {
                // A client that hangs up while the process reads nothing (its pipe full) gives stdin back within a
                // second, as it asked (open or closed), instead of holding it until the process reads.
                try await input.write(chunk, unlessGone: connection)
            } catch is ProcInput.WriterGone {
                input.finish(keepOpen: keepOpen)
                throw APIError.badRequest("the client went away after \(written) bytes went into the stdin of \(path)")
            } catch {
                input.finish(keepOpen: false)
                throw APIError(status: 409, code: "closed", message: "the process closed its stdin (\(path)) after \(written) bytes: \(error)")
            }
            written += chunk.readableBytes
        }
        input.finish(keepOpen: keepOpen)
        return try json(StdinView(path: path, bytes: written, closed: !keepOpen))
    }
}
