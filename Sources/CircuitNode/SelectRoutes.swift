import CircuitAPI
import CircuitStateMachine
import Foundation
import HTTPTypes
import Hummingbird
import NIOCore

/// A select's wait, served by the host that owns the select (any other node answers 307 with its address), and the
/// channel hosts' proposals to it (docs/selects.md).
struct SelectRoutes: RouterMiddleware {
    typealias Context = APIContext
    let runtime: HostRuntime
    let ownerAddress: @Sendable (String) async throws -> String?

    func handle(
        _ request: Request, context: Context, next: (Request, Context) async throws -> Response
    ) async throws -> Response {
        guard let (op, path) = try OwnerRouting.operation(request, under: "/v1/select/") else { return try await next(request, context) }
        guard request.method == .post else {
            throw APIError(status: 405, code: "method_not_allowed", message: "\(op) is POST /v1/select/\(op)/PATH")
        }
        if let error = Names.validate(path) { throw APIError.from(error) }
        switch op {
        case "wait":
            guard let owner = Names.host(of: path) else { throw APIError.badRequest("\(path) is not under a host: a select lives on a host") }
            if owner != runtime.hostID {
                return try await OwnerRouting.redirect(request, owner: owner, path: path, ownerAddress: ownerAddress)
            }
            guard let view = try await HostRuntime.peekIfPresent(path, at: runtime.api) else { throw APIError.from(.notFound(path: path)) }
            guard view.kind == "select" else { throw APIError.from(.wrongKind(path: path, expected: "select", actual: view.kind)) }
            let clauses = try Selects.clauses(view.clauses ?? "")
            return try await OwnerRouting.whileConnected(request, if: true) { _ in
                try json(try await runtime.selects.wait(path, clauses: clauses))
            }
        case "propose":
            let q = request.uri.queryParameters
            guard let run = q.get("run").map({ String($0) }), let clause = q.get("clause").flatMap({ Int($0) }),
                let op = q.get("op").map({ String($0) })
            else { throw APIError.badRequest("propose needs run, clause and op") }
            var outcome = SelectOutcomeView(clause: clause, op: op)
            outcome.chan = q.get("chan").map { String($0) }
            if let failure = q.get("failure") {
                outcome.error = failure == "closed" ? "send on a closed channel" : "the channel was removed"
            } else if q.get("closed") == "1" {
                outcome.closed = true
            } else if op == "recv" {
                let body = try await request.body.collect(upTo: runtime.channels.maxMessageBytes)
                let bytes = Array(buffer: body)
                outcome.messageBase64 = Data(bytes).base64EncodedString()
                outcome.message = String(decoding: bytes, as: UTF8.self)
            }
            return try json(["commit": runtime.selects.propose(run, outcome)])
        default:
            throw APIError(status: 404, code: "not_found", message: "no such select operation \(op.debugDescription) (wait)")
        }
    }
}
