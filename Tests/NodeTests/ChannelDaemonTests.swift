import CircuitAPI
import CircuitClient
import CircuitNode
import CircuitTestSupport
import Foundation
import NIOCore
import NIOHTTP1
import Synchronization
import Testing

/// Messages collected by a receiving task.
private final class Collected: Sendable {
    private let messages = Mutex<[[UInt8]]>([])
    func add(_ m: [UInt8]) { messages.withLock { $0.append(m) } }
    var all: [[UInt8]] { messages.withLock { $0 } }
}

@Suite("Channels between hosts", .serialized, .timeLimit(.minutes(2)))
struct ChannelDaemonTests {
    @Test("a channel's buffer lives on its host, member or worker: a rendezvous across three hosts, other nodes redirect, FIFO, try, close, a name that exists, a message too large, a receiver that hangs up takes nothing, removal fails the waiters, and the CLI's send and recv")
    func channels() async throws {
        let (cluster, leader) = try await daemonsWithWorker()
        defer { cluster.stopAll(signal: SIGKILL) }
        let a = leader, b = (leader + 1) % 3, c = (leader + 2) % 3
        let owner = cluster.members[b].folder.hostID
        let worker = cluster.members[3].folder.hostID
        var client = cluster.client(a)
        client.timeout = 30

        // Capacity 0, on host B: a try-send finds no receiver; a receive on B (found through the membership) is met
        // by a send asked of host C, which names B (307), where the client sends it.
        let r = "/\(owner)/rendezvous"
        try await client.makeChannel(r, capacity: 0)
        let direct = try await client.channel(r)
        #expect(direct.owner.endpoints == [cluster.members[b].api], "the client talks to the owning host")
        var viaC = cluster.client(c)
        viaC.timeout = 30
        let forwarded = Chan(path: r, through: viaC)
        #expect(await apiCode { try await forwarded.trySend([1]) } == "would_block")
        let received = Task { try await direct.receive() }
        try await eventually("the receiver waiting on B") { (try? await direct.stat())?.waitingReceivers == 1 }
        try await forwarded.send(Array("across hosts".utf8))
        #expect(try await received.value == Array("across hosts".utf8))
        // Streamed calls asked of C reach B's channel as well (the receive follows C's 307; for the send, C is asked
        // where the channel is served before anything is streamed): two messages streamed in, taken by a streamed receive.
        let streamedIn = Collected()
        let streamedReceive = Task { try await forwarded.receive(upTo: 2) { streamedIn.add($0) } }
        let two = AsyncStream<ByteBuffer> { c in
            c.yield(ByteBuffer(bytes: [1]))
            c.yield(ByteBuffer(bytes: [2, 2]))
            c.finish()
        }
        #expect(try await forwarded.send(streaming: two) == 2)
        #expect(try await streamedReceive.value == 2)
        #expect(streamedIn.all == [[1], [2, 2]])

        // A blocking call made on a keep-alive pool's connection: the pool's next call is answered at once.
        let ownerAPI = cluster.members[b].api
        let pooled = Task { try await HTTPPool.shared(ownerAPI).perform(.POST, "/v1/chan/recv\(r)", timeout: .seconds(30)) }
        try await eventually("the pooled receiver waiting") { (try? await direct.stat())?.waitingReceivers == 1 }
        try await direct.send([42])
        #expect(try await pooled.value.body == [42])
        let next = try await HTTPPool.shared(ownerAPI).perform(.GET, "/v1/status", timeout: .seconds(5))
        #expect(next.status == 200)

        // Capacity 3, on the worker, used through members: FIFO, try, close.
        let q = "/\(worker)/queue"
        try await client.makeChannel(q, capacity: 3)
        let queue = Chan(path: q, through: client)
        for i in 1...3 { try await queue.send([UInt8(i)]) }
        #expect(await apiCode { try await queue.trySend([4]) } == "would_block")
        let stat = try await queue.stat()
        #expect(stat.capacity == 3 && stat.buffered == 3 && stat.sends == 3 && !stat.closed)
        try await queue.close()
        #expect(await apiCode { try await queue.send([5]) } == "closed")
        var order: [UInt8] = []
        for _ in 1...3 { order += try await queue.receive() }
        #expect(order == [1, 2, 3], "FIFO, and a closed channel delivers what it holds")
        #expect(await apiCode { _ = try await queue.receive() } == "closed")
        #expect(await apiCode { try await queue.close() } == "closed", "closing twice is an error")

        // Bad input: a name that exists (the error names what is there), a message over the limit, a channel that does not exist, a channel op on a process's name.
        let big = await apiCode { try await direct.send([UInt8](repeating: 0, count: (1 << 20) + 1)) }
        #expect(big == "too_large", "\(big ?? "")")
        var exists: APIError?
        do { try await client.makeChannel(q, capacity: 1) } catch { if case .api(let e) = error { exists = e } }
        #expect(exists?.code == "exists" && exists?.message == "\(q) already holds a chan")
        #expect(await apiCode { _ = try await Chan(path: "/\(owner)/none", through: client).stat() } == "not_found")
        #expect(await apiCode { _ = try await Chan(path: "/records/x", through: client).stat() } == "bad_request")

        // Any other node answers with where to go.
        let elsewhere = try await HTTPExchange.perform(.POST, "/v1/chan/recv\(r)", to: cluster.members[c].api)
        #expect(elsewhere.status == 307 && elsewhere.location == "http://\(cluster.members[b].api)/v1/chan/recv\(r)")

        // A receiver that hangs up (its connection closes while it waits) is withdrawn at the owner: the next send
        // finds no receiver and nothing is lost.
        let hungUp = try? await HTTPExchange.perform(
            .POST, "/v1/chan/recv\(r)", to: cluster.members[b].api, timeout: .milliseconds(500))
        #expect(hungUp == nil, "the receive timed out on the client's side")
        try await eventually("the hung-up receiver withdrawn at the owner") { (try? await direct.stat())?.waitingReceivers == 0 }
        #expect(await apiCode { try await direct.trySend([7]) } == "would_block")

        // Removing the channel fails its waiters with gone.
        let waiting = Task { try await direct.receive() }
        try await eventually("a receiver waiting") { (try? await direct.stat())?.waitingReceivers == 1 }
        _ = try await client.remove(element: r)
        #expect(await apiCode { _ = try await waiting.value } == "gone")
        // So does a streamed receive, after what came before; one of a channel that does not exist fails at once.
        #expect(await apiCode { _ = try await Chan(path: "/\(owner)/none", through: client).receive(upTo: 3) { (_: [UInt8]) in } } == "not_found")
        let s = "/\(owner)/streamed"
        try await client.makeChannel(s, capacity: 4)
        let streamed = try await client.channel(s)
        try await streamed.send([1])
        let streamedGot = Collected()
        let streamedWaiting = Task { try await streamed.receive(upTo: 3) { streamedGot.add($0) } }
        try await eventually("the streamed receiver waiting for its second") { (try? await streamed.stat())?.waitingReceivers == 1 }
        _ = try await client.remove(element: s)
        #expect(await apiCode { _ = try await streamedWaiting.value } == "gone", "not a clean end with fewer messages")
        #expect(streamedGot.all == [[1]])

        // Pipelined: 2,000 messages in two requests, taken by one streaming receive through a capacity-16 channel,
        // in order; a stream that ends inside a message is refused, naming why.
        let piped = "/\(owner)/piped"
        try await client.makeChannel(piped, capacity: 16)
        let pipe = try await client.channel(piped)
        let batch = (0..<2000).map { Array("m\($0)".utf8) }
        let gotten = Collected()
        let drained = Task { try await pipe.receive(upTo: 2000) { gotten.add($0) } }
        #expect(try await pipe.send(contentsOf: Array(batch[..<1000])) == 1000)
        #expect(try await pipe.send(contentsOf: Array(batch[1000...])) == 1000)
        #expect(try await drained.value == 2000)
        #expect(gotten.all == batch, "every message, in order")
        // Large messages, each spread over many of the body's chunks, through a capacity-1 channel.
        let large = (0..<6).map { i in (0..<((1 << 20) - 7 * i)).map { UInt8(truncatingIfNeeded: $0 &* (i + 1)) } }
        let bulk = Collected()
        let bulkDrained = Task { try await pipe.receive(upTo: 6) { bulk.add($0) } }
        #expect(try await pipe.send(contentsOf: large) == 6)
        #expect(try await bulkDrained.value == 6)
        #expect(bulk.all == large, "every large message whole, in order")
        // The same through the ByteBuffer calls (a large message neither copied into the request nor out of the
        // answer), with sizes around the host's 64 KiB copy threshold mixed in.
        let mixed = [0, 3, 70_000, 1 << 20, 5, (1 << 20) - 1, 65_535, 65_536].enumerated().map { i, n in
            (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ i) }
        }
        let pieces = Collected()
        let piecesDrained = Task { try await pipe.receive(upTo: mixed.count) { (p: [ByteBuffer]) in pieces.add(p.flatMap { Array(buffer: $0) }) } }
        #expect(try await pipe.send(contentsOf: mixed.map { ByteBuffer(bytes: $0) }) == mixed.count)
        #expect(try await piecesDrained.value == mixed.count)
        #expect(pieces.all == mixed, "every message whole, in order, from its pieces")
        let torn = try await HTTPExchange.perform(.POST, "/v1/chan/send\(piped)?stream=1", to: cluster.members[b].api, body: [0, 0, 0, 9, 1])
        #expect(torn.status == 400 && String(decoding: torn.body, as: UTF8.self).contains("ends inside a message"))

        // A handle names the channel it was made for (its create revision): once that channel is removed and another
        // made at the same path, the old handle answers gone and the new one reaches the new channel.
        let again = "/\(owner)/again"
        let first = try await client.makeChannel(again, capacity: 4)
        let oldHandle = try await client.channel(again)
        #expect(oldHandle.createRevision == first.revision)
        try await oldHandle.send([1])
        _ = try await client.remove(element: again)
        let second = try await client.makeChannel(again, capacity: 4)
        let newHandle = try await client.channel(again)
        #expect(newHandle.createRevision == second.revision)
        try await newHandle.send([2])
        #expect(await apiCode { try await oldHandle.send([3]) } == "gone")
        #expect(try await newHandle.receive() == [2], "the new channel holds only what was sent to it")
        let badRevision = try await HTTPExchange.perform(.GET, "/v1/chan/stat\(again)?created=x", to: cluster.members[b].api)
        #expect(badRevision.status == 400 && String(decoding: badRevision.body, as: UTF8.self).contains("created=x"))

        // The CLI: all of standard input is one message; recv writes it out as it came.
        let api = cluster.members[c].api
        let path = "/\(worker)/cli"
        let made = try await runCircuit(["mkchan", "--node", api, path, "1"])
        #expect(made.0 == 0, "\(made)")
        let text = Array("line one\nline two\n".utf8)
        let sent = try await runCircuit(["send", "--node", api, path], input: text)
        #expect(sent.0 == 0, "\(sent)")
        let got = try await runCircuit(["recv", "--node", api, path])
        #expect(got.0 == 0 && Array(got.1.utf8) == text, "\(got)")
        let empty = try await runCircuit(["recv", "--try", "--node", api, path])
        #expect(empty.0 == 1 && empty.2.contains("holds no message"), "\(empty)")
    }

    @Test("membership subscriptions are received like channels: @join lists the live hosts, then each that joins; @leave gets each that leaves; clients cannot send to them")
    func subscriptions() async throws {
        let cluster = try daemons(3)
        defer { cluster.stopAll(signal: SIGKILL) }
        let leader = try await cluster.leader()
        let hosts = try await cluster.allAlive().map { "/" + $0.id }.sorted()
        let b = (leader + 1) % 3
        let owner = cluster.members[b].folder.hostID
        var client = cluster.client(leader)
        client.timeout = 30
        try await client.makeSubscription("/\(owner)/joins", events: "join")
        try await client.makeSubscription("/\(owner)/leaves", events: "leave")
        let joins = try await client.channel("/\(owner)/joins")
        let leaves = try await client.channel("/\(owner)/leaves")
        // The library's Membership (the slides' WaitForJoinOrLeave), asked of two nodes: the same events, in order.
        var membership = try await client.membership()
        var viaB = cluster.client(b)
        viaB.timeout = 30
        var membershipB = try await viaB.membership()
        var firstEvents: [MembershipEvent] = []
        for _ in hosts { firstEvents.append(try await membership.waitForJoinOrLeave()) }
        #expect(firstEvents == hosts.map { .joined(String($0.dropFirst())) }, "first every live host")
        var listed: [String] = []
        for _ in hosts { listed.append(String(decoding: try await joins.receive(), as: UTF8.self)) }
        #expect(listed == hosts, "first every live host")
        #expect(await apiCode { _ = try await joins.tryReceive() } == "would_block")
        #expect(await apiCode { try await joins.send([1]) } == "wrong_kind", "only the host sends to a subscription")

        // A worker joins, then stops (it leaves at once).
        try cluster.add(join: cluster.members[leader].api, as: "worker")
        try cluster.start(3)
        let worker = "/" + cluster.members[3].folder.hostID
        #expect(String(decoding: try await joins.receive(), as: UTF8.self) == worker)
        let pid = try #require(cluster.members[3].process?.processIdentifier)
        kill(pid, SIGTERM)
        #expect(String(decoding: try await leaves.receive(), as: UTF8.self) == worker)
        let workerID = String(worker.dropFirst())
        #expect(try await membership.waitForJoinOrLeave() == .joined(workerID))
        #expect(try await membership.waitForJoinOrLeave() == .left(workerID))
        var seenByB: [MembershipEvent] = []
        for _ in 0..<(hosts.count + 2) { seenByB.append(try await membershipB.waitForJoinOrLeave()) }
        #expect(seenByB == firstEvents + [.joined(workerID), .left(workerID)], "another node's client sees the same, in the same order")

        // The CLI: mk@join, then recv prints one host's path.
        let api = cluster.members[leader].api
        let made = try await runCircuit(["mk@join", "--node", api, "/\(owner)/cli"])
        #expect(made.0 == 0, "\(made)")
        let got = try await runCircuit(["recv", "--node", api, "/\(owner)/cli"])
        #expect(got.0 == 0 && got.1 == hosts[0], "\(got)")
    }
}
