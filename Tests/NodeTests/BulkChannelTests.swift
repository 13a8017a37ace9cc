import CircuitAPI
import CircuitClient
import CircuitNode
import CircuitTestSupport
import Foundation
import Testing

@Suite("Channels with large messages", .timeLimit(.minutes(2)))
struct BulkChannelTests {
    @Test("1 MiB messages through a small buffer, a sender and a receiver for seconds: every send succeeds and every message arrives whole")
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
    }
}

struct SendFailed: Error { let index: Int; let error: any Error }
