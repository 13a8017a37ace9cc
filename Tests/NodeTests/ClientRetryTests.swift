import CircuitClient
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
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

/// Answers every request with `response` as soon as its head is in, before reading its body, then closes its side
/// of the connection and reads on, discarding, until the client hangs up: a server refusing a body too large.
private final class EarlyAnswer: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    let response: String
    private var head: [UInt8] = []
    private var answered = false

    init(_ response: String) { self.response = response }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !answered else { return }
        head += Self.unwrapInboundIn(data).readableBytesView
        guard head.firstRange(of: Array("\r\n\r\n".utf8)) != nil else { return }
        answered = true
        context.writeAndFlush(NIOAny(ByteBuffer(string: response)), promise: nil)
        context.close(mode: .output, promise: nil)
    }

    static func start(_ response: String) async throws -> any Channel {
        try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(EarlyAnswer(response)) }
            }
            .bind(host: "127.0.0.1", port: 0).get()
    }
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

    @Test("a server that answers before it has read the whole body, and closes, is heard: the client returns its answer, not the failed write")
    func earlyAnswerIsReturned() async throws {
        let refusal = #"{"error":{"code":"too_large","message":"a message is at most 1 bytes"}}"#
        let server = try await EarlyAnswer.start(
            "HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\nContent-Length: \(refusal.utf8.count)\r\nConnection: close\r\n\r\n\(refusal)")
        defer { server.close(promise: nil) }
        let port = server.localAddress!.port!
        // Far more than the sockets' buffers hold: the body is still being written when the answer and the close come.
        let body = ByteBuffer(repeating: 7, count: 32 << 20)
        let answer = try await HTTPExchange.perform(
            .POST, "/v1/chan/send/Xa/c?stream=1", to: "127.0.0.1:\(port)", buffer: body, timeout: .seconds(20), tls: nil)
        #expect(answer.status == 413)
        #expect(String(decoding: answer.body, as: UTF8.self) == refusal)
    }

    private func freeLoopbackPortNobodyListensOn() throws -> Int {
        let listener = try SilentListener()
        return listener.port  // closed when `listener` goes: nothing listens there after
    }
}
