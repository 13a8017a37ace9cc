import CircuitAPI
import CircuitClient
import CircuitNode
import CircuitTestSupport
import Foundation
import NIOCore
import Testing

@Suite("Channels with large messages", .timeLimit(.minutes(4)))
struct BulkChannelTests {
    @Test("1 MiB messages through a small buffer, a sender and a receiver for seconds: every send succeeds and every message arrives whole; a streaming sender's messages arrive whole and in order, a refusal midway stops an endless one, and a producer's failure ends its stream after what it gave")
    func bulk() async throws {
        let cluster = try daemons(3)
        defer { cluster.stopAll(signal: SIGKILL) }
        let leader = try await cluster.leader()
        _ = try await cluster.allAlive()
        var client = cluster.client(leader)
        client.timeout = 30
        let host = cluster.members[(leader + 1) % 3].folder.hostID
        try await client.makeChannel("/\(host)/bulk", capacity: 4)
        let chan = try await client.channel("/\(host)/bulk")
        let message = [UInt8](repeating: 0x61, count: 1 << 20)
        let count = 400
        async let sent: Int = {
            for i in 0..<count {
                do { try await chan.send(message) } catch { throw SendFailed(index: i, error: error) }
            }
            return count
        }()
        for _ in 0..<count { #expect(try await chan.receive().count == 1 << 20) }
        let total = try await sent
        #expect(total == count)

        // A streaming sender, one request for as long as its sequence lasts, fed by a producer task as it goes:
        // every message whole and in order, small ones and large ones mixed, through a capacity-4 channel.
        try await client.makeChannel("/\(host)/streamed", capacity: 4)
        let streamed = try await client.channel("/\(host)/streamed")
        let messages = (0..<60).map { i in
            ByteBuffer(bytes: (0..<(i % 3 == 0 ? (1 << 20) - i : i * 5)).map { UInt8(truncatingIfNeeded: $0 &+ i) })
        }
        let (produced, producer) = AsyncStream.makeStream(of: ByteBuffer.self)
        let feeding = Task {
            for m in messages { producer.yield(m) }
            producer.finish()
        }
        async let sentStreamed = streamed.send(streaming: produced)
        var received: [ByteBuffer] = []
        _ = try await streamed.receive(upTo: messages.count) { (pieces: [ByteBuffer]) in
            var whole = ByteBuffer()
            for var piece in pieces { whole.writeBuffer(&piece) }
            received.append(whole)
        }
        #expect(try await sentStreamed == messages.count)
        await feeding.value
        #expect(received == messages, "every message whole, in order")

        // An endless producer is stopped by the host's refusal: closing the channel fails the send that waits on it,
        // and the stream ends with that error.
        try await client.makeChannel("/\(host)/refused", capacity: 1)
        let refused = try await client.channel("/\(host)/refused")
        let endless = Task { try await refused.send(streaming: AsyncStream { ByteBuffer(bytes: [0x6d]) }) }
        try await eventually("a streamed send waiting on the full channel") { (try? await refused.stat())?.waitingSenders == 1 }
        try await refused.close()
        #expect(await apiCode { _ = try await endless.value } == "closed")

        // A sequence that fails ends the stream with its error; what it gave before was sent.
        struct ProducerFailed: Error {}
        try await client.makeChannel("/\(host)/failed", capacity: 8)
        let failed = try await client.channel("/\(host)/failed")
        let (three, feed) = AsyncThrowingStream.makeStream(of: ByteBuffer.self)
        for i in 0..<3 { feed.yield(ByteBuffer(bytes: [UInt8(i)])) }
        feed.finish(throwing: ProducerFailed())
        var failure: CircuitClientError?
        do { try await failed.send(streaming: three) } catch { failure = error }
        guard case .noAnswer(_, let why)? = failure else {
            Issue.record("the producer's failure was not reported as such: \(String(describing: failure))")
            return
        }
        #expect(why.contains("ProducerFailed"), "\(why)")
        try await eventually("the three messages before the failure buffered") { (try? await failed.stat())?.buffered == 3 }
        for i in 0..<3 { #expect(try await failed.receive() == [UInt8(i)]) }
    }
}

struct SendFailed: Error { let index: Int; let error: any Error }
