import CircuitAPI
import Hummingbird
import NIOCore

/// What the data-plane routes (`/v1/chan/`, `/v1/proc/`, `/v1/select/`) share: served by the host that owns the
/// element, named to the client by any other node.
enum OwnerRouting {
    /// `/v1/<area>/OP/PATH` split into OP and PATH; nil if the request is not under `prefix`.
    static func operation(_ request: Request, under prefix: String) throws -> (op: String, path: String)? {
        let uri = request.uri.path
        guard uri.hasPrefix(prefix) else { return nil }
        let rest = uri.dropFirst(prefix.count)
        guard let slash = rest.firstIndex(of: "/") else { throw APIError(status: 404, code: "not_found", message: "no such endpoint: \(uri)") }
        return (String(rest[..<slash]), String(rest[slash...]))
    }

    /// 307 to the owning host's API: the client follows it and talks to that host directly.
    static func redirect(
        _ request: Request, owner: String, path: String, ownerAddress: @Sendable (String) async throws -> String?
    ) async throws -> Response {
        guard let address = try await ownerAddress(owner) else { throw APIError.from(.hostNotAlive(owner)) }
        let target = "http://\(address)\(request.uri.path)" + (request.uri.query.map { "?" + $0 } ?? "")
        let error = APIError(status: 307, code: "wrong_host", message: "\(path) runs on \(owner): ask \(address)")
        var response = try json(ErrorEnvelope(error))
        response.status = .temporaryRedirect
        response.headers[.location] = target
        return response
    }

    /// Runs `operation` on the request's body; if `blocking`, cancels it when the client hangs up. Such a connection
    /// is not read again after the answer, which says so (`Connection: close`): blocking calls come on connections
    /// of their own.
    static func whileConnected(
        _ request: Request, if blocking: Bool, _ operation: (RequestBody) async throws -> Response
    ) async throws -> Response {
        guard blocking else { return try await operation(request.body) }
        var response = try await request.body.consumeWithCancellationOnInboundClose(operation)
        response.headers[.connection] = "close"
        return response
    }

    /// The whole body, refused (413 `too_large`) past `limit` bytes.
    static func collect(_ body: RequestBody, upTo limit: Int) async throws -> ByteBuffer {
        do {
            return try await body.collect(upTo: limit)
        } catch is NIOTooManyBytesError {
            throw Channels.tooLarge(limit)
        }
    }
}
