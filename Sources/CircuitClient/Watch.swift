import CircuitAPI
import Foundation

extension CircuitClient {
    /// Every change under `path` from revision `from` on (default: from the next change), in order, as the node
    /// asked (the first endpoint) applies them. The stream ends with `CircuitClientError.api` (code `compacted`,
    /// naming the revision to resume from) if the history no longer reaches back, or if this watcher fell too far
    /// behind; dropping the stream closes the connection.
    /// `hostsOnly`: only membership events (hosts joining, leaving, changing role).
    public func watch(
        _ path: String, from revision: UInt64? = nil, hostsOnly: Bool = false
    ) -> AsyncThrowingStream<EventView, any Error> {
        let (stream, continuation) = AsyncThrowingStream<EventView, any Error>.makeStream()
        let endpoint = endpoints.first ?? "127.0.0.1:7700"
        var query = revision.map { ["from=\($0)"] } ?? []
        if hostsOnly { query.append("hosts=1") }
        let uri = "/v1/watch" + (path == "/" ? "" : Self.rooted(path)) + (query.isEmpty ? "" : "?" + query.joined(separator: "&"))
        let task = Task {
            do {
                let (status, errorBody) = try await HTTPExchange.stream(uri, to: endpoint, tls: tls) { line in
                    if let event = try? JSONDecoder().decode(EventView.self, from: Data(line)) {
                        continuation.yield(event)
                    } else if let envelope = try? JSONDecoder().decode(ErrorEnvelope.self, from: Data(line)) {
                        throw CircuitClientError.api(APIError(status: 410, code: envelope.error.code, message: envelope.error.message))
                    } else {
                        throw CircuitClientError.badAnswer(String(decoding: line, as: UTF8.self))
                    }
                }
                if status != 200 {
                    if let envelope = try? JSONDecoder().decode(ErrorEnvelope.self, from: Data(errorBody)) {
                        throw CircuitClientError.api(APIError(status: status, code: envelope.error.code, message: envelope.error.message))
                    }
                    throw CircuitClientError.badAnswer("HTTP \(status)")
                }
                continuation.finish()
            } catch let error as CircuitClientError {
                continuation.finish(throwing: error)
            } catch {
                continuation.finish(throwing: CircuitClientError.unreachable(endpoints: [endpoint], why: "\(error)"))
            }
        }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }
}
