import CircuitAPI
import CircuitClient
import CircuitNode
import CircuitTestSupport
import Foundation
import NIOCore
import Synchronization
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
        // every message whole and in order, small, empty and large ones mixed, through a capacity-4 channel.
        try await client.makeChannel("/\(host)/streamed", capacity: 4)
        let streamed = try await client.channel("/\(host)/streamed")
        let messages = [ByteBuffer()] + (0..<60).map { i in
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

        // An endless producer of 64 KiB messages, nobody receiving: back-pressure holds it to what the window, the
        // sockets and the host's buffers hold (tens of MiB, not the gigabytes an unbounded writer queues), and the
        // host's refusal, closing the channel failing the send that waits on it, ends the stream with that error.
        try await client.makeChannel("/\(host)/refused", capacity: 1)
        let refused = try await client.channel("/\(host)/refused")
        let taken = TakenCount()
        let block = ByteBuffer(repeating: 0x6d, count: 64 << 10)
        let endless = Task {
            try await refused.send(streaming: AsyncStream { () -> ByteBuffer? in
                taken.add()
                return block
            })
        }
        try await eventually("a streamed send waiting on the full channel") { (try? await refused.stat())?.waitingSenders == 1 }
        try await refused.close()
        #expect(await apiCode { _ = try await endless.value } == "closed")
        #expect(taken.value < 2_000, "taken from the producer: \(taken.value) messages of 64 KiB")

        // The host refuses a message too large as soon as it reads its length; the sender learns it even though its
        // producer has nothing more to send and never finishes.
        let (idle, idleProducer) = AsyncStream.makeStream(of: ByteBuffer.self)
        idleProducer.yield(ByteBuffer(repeating: 0, count: (1 << 20) + 1))
        try await client.makeChannel("/\(host)/idle", capacity: 1)
        let tooLarge = try await client.channel("/\(host)/idle")
        #expect(await apiCode { try await tooLarge.send(streaming: idle) } == "too_large")
        idleProducer.finish()

        // A sequence that fails ends the request cleanly: its error is thrown as it is, once the host answered for
        // the three messages before it, which were sent.
        struct ProducerFailed: Error {}
        try await client.makeChannel("/\(host)/failed", capacity: 8)
        let failed = try await client.channel("/\(host)/failed")
        let (three, feed) = AsyncThrowingStream.makeStream(of: ByteBuffer.self)
        for i in 0..<3 { feed.yield(ByteBuffer(bytes: [UInt8(i)])) }
        feed.finish(throwing: ProducerFailed())
        await #expect(throws: ProducerFailed.self) { try await failed.send(streaming: three) }
        #expect(try await failed.stat().buffered == 3)
        for i in 0..<3 { #expect(try await failed.receive() == [UInt8(i)]) }
    }
}

/// How many messages a producer gave.
private final class TakenCount: Sendable {
    private let count = Mutex(0)
    func add() { count.withLock { $0 += 1 } }
    var value: Int { count.withLock { $0 } }
}

struct SendFailed: Error { let index: Int; let error: any Error }
