import CircuitClient
import Foundation
import Testing

/// A listener that never accepts: the kernel completes connections into its backlog and takes the request's bytes,
/// and no answer ever comes, as from a node that stalled after reading a request.
private final class SilentListener {
    let fd: Int32
    let port: Int
    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.fd = fd
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, length) == 0 && listen(fd, 16) == 0 && getsockname(fd, $0, &length) == 0
            }
        }
        guard ok else {
            close(fd)
            throw POSIXError(.EADDRINUSE)
        }
        port = Int(UInt16(bigEndian: address.sin_port))
    }
    deinit { close(fd) }
}

@Suite("The client library's retries")
struct ClientRetryTests {
    @Test("a write sent to a node that never answers fails as no answer (it may have taken effect) and is not sent to the next endpoint; a read tries every endpoint")
    func writeWithoutAnswerIsNotRetried() async throws {
        let first = try SilentListener()
        let second = try SilentListener()
        var client = CircuitClient(endpoints: ["127.0.0.1:\(first.port)", "127.0.0.1:\(second.port)"])
        client.timeout = 0.3
        do {
            try await client.put("/records/a", Array("x".utf8))
            Issue.record("a write without an answer succeeded")
        } catch {
            guard case .noAnswer(let endpoint, _) = error else {
                Issue.record("expected noAnswer, got \(error)")
                return
            }
            #expect(endpoint == "127.0.0.1:\(first.port)")
            #expect(error.description.contains("may or may not have taken effect"))
        }
        do {
            _ = try await client.get("/records/a")
            Issue.record("a read without an answer succeeded")
        } catch {
            guard case .unreachable(let endpoints, _) = error else {
                Issue.record("expected unreachable, got \(error)")
                return
            }
            #expect(endpoints.count == 2)
        }
    }

    @Test("a write to an endpoint where nothing listens goes on to the next (it was sent nowhere), and fails as unreachable when none listens")
    func refusedWriteGoesOn() async throws {
        let closed = try freeLoopbackPortNobodyListensOn()
        var client = CircuitClient(endpoints: ["127.0.0.1:\(closed)", "127.0.0.1:\(closed)"])
        client.timeout = 1
        do {
            try await client.put("/records/a", Array("x".utf8))
            Issue.record("a write to nowhere succeeded")
        } catch {
            guard case .unreachable(let endpoints, _) = error else {
                Issue.record("expected unreachable, got \(error)")
                return
            }
            #expect(endpoints.count == 2)
        }
    }

    private func freeLoopbackPortNobodyListensOn() throws -> Int {
        let listener = try SilentListener()
        return listener.port  // closed when `listener` goes: nothing listens there after
    }
}
