import CircuitAPI
import CircuitTestSupport
import Foundation
import NIOCore
import Synchronization
import Testing

@testable import CircuitNode

private let m1: ChanMessage = [1]
private let m2: ChanMessage = [2]
private let m3: ChanMessage = [3]

@Suite("ChannelCore: Go's channel semantics as a pure value")
struct ChannelCoreTests {
    @Test("capacity 0 is a rendezvous: a send waits for its receiver, a receive for its sender")
    func rendezvous() {
        var c = ChannelCore(capacity: 0)
        #expect(c.send(1, m1, wait: true) == [], "no receiver: the sender waits")
        #expect(c.waitingSenders == 1 && c.buffered == 0)
        #expect(c.receive(2, wait: true) == [.received(2, m1), .sent(1)])
        #expect(c.receive(3, wait: true) == [], "no sender: the receiver waits")
        #expect(c.send(4, m2, wait: true) == [.received(3, m2), .sent(4)])
        #expect(c.sends == 2 && c.receives == 2 && c.waitingSenders == 0 && c.waitingReceivers == 0)
    }

    @Test("a buffer takes sends up to its capacity; messages leave in the order they were sent, waiting senders included")
    func fifo() {
        var c = ChannelCore(capacity: 2)
        #expect(c.send(1, m1, wait: true) == [.sent(1)])
        #expect(c.send(2, m2, wait: true) == [.sent(2)])
        #expect(c.send(3, m3, wait: true) == [], "full: the third sender waits")
        #expect(c.buffered == 2 && c.bufferedBytes == 2)
        // The first receive frees a slot: the waiting sender's message moves in behind the others.
        #expect(c.receive(4, wait: true) == [.received(4, m1), .sent(3)])
        #expect(c.receive(5, wait: true) == [.received(5, m2)])
        #expect(c.receive(6, wait: true) == [.received(6, m3)])
        #expect(c.buffered == 0 && c.bufferedBytes == 0)
    }

    @Test("try-send and try-receive never wait")
    func tries() {
        var c = ChannelCore(capacity: 1)
        #expect(c.receive(1, wait: false) == [.failed(1, .wouldBlock)])
        #expect(c.send(2, m1, wait: false) == [.sent(2)])
        #expect(c.send(3, m2, wait: false) == [.failed(3, .wouldBlock)])
        #expect(c.waitingSenders == 0 && c.buffered == 1)
        #expect(c.receive(4, wait: false) == [.received(4, m1)])
        var r = ChannelCore(capacity: 0)
        #expect(r.send(5, m1, wait: false) == [.failed(5, .wouldBlock)], "capacity 0 and nobody receiving")
        #expect(r.receive(6, wait: true) == [])
        #expect(r.send(7, m2, wait: false) == [.received(6, m2), .sent(7)], "a waiting receiver takes a try-send")
    }

    @Test("a closed channel delivers what it holds, then reports closed; sending on it and closing it again are errors")
    func close() {
        var c = ChannelCore(capacity: 2)
        _ = c.send(1, m1, wait: true)
        _ = c.send(2, m2, wait: true)
        let closed = c.close()
        #expect(closed == [])
        let again = c.close()
        #expect(again == nil, "a second close is refused")
        #expect(c.send(3, m3, wait: true) == [.failed(3, .closed)])
        #expect(c.receive(4, wait: true) == [.received(4, m1)])
        #expect(c.receive(5, wait: true) == [.received(5, m2)])
        #expect(c.receive(6, wait: true) == [.failed(6, .closed)])
        #expect(c.receive(7, wait: false) == [.failed(7, .closed)])
    }

    @Test("closing wakes every waiting receiver with closed and fails every waiting sender")
    func closeWakesWaiters() {
        var r = ChannelCore(capacity: 0)
        _ = r.receive(1, wait: true)
        _ = r.receive(2, wait: true)
        let woken = r.close()
        #expect(woken == [.failed(1, .closed), .failed(2, .closed)])
        var s = ChannelCore(capacity: 0)
        _ = s.send(3, m1, wait: true)
        let failed = s.close()
        #expect(failed == [.failed(3, .closed)])
        #expect(s.receive(4, wait: true) == [.failed(4, .closed)], "the failed sender's message was not kept")
    }

    @Test("a cancelled waiter takes nothing with it: its message is never delivered, and it receives nothing")
    func cancel() {
        var c = ChannelCore(capacity: 0)
        _ = c.send(1, m1, wait: true)
        _ = c.send(2, m2, wait: true)
        let cancelled = c.cancel(1)
        let twice = c.cancel(1)
        #expect(cancelled && !twice, "cancelled once; then already gone")
        #expect(c.receive(3, wait: true) == [.received(3, m2), .sent(2)])
        _ = c.receive(4, wait: true)
        _ = c.receive(5, wait: true)
        let receiver = c.cancel(4)
        #expect(receiver)
        #expect(c.send(6, m3, wait: true) == [.received(5, m3), .sent(6)], "the cancelled receiver is skipped")
        #expect(c.sends == 2 && c.receives == 2)
    }

    @Test("a removed channel fails every waiter with gone and drops its buffer")
    func remove() {
        var c = ChannelCore(capacity: 1)
        _ = c.send(1, m1, wait: true)
        _ = c.send(2, m2, wait: true)
        #expect(c.remove() == [.failed(2, .gone)])
        #expect(c.buffered == 0 && c.bufferedBytes == 0)
        #expect(c.send(3, m3, wait: true) == [.failed(3, .gone)])
        #expect(c.receive(4, wait: true) == [.failed(4, .gone)])
    }
}

@Suite("ChannelCore: a select's offers are proposed, then completed or put back")
struct ChannelOfferTests {
    @Test("a receive offer met by a send is proposed; accepted, the send completes and nothing else moves meanwhile")
    func acceptedReceive() {
        var c = ChannelCore(capacity: 0)
        #expect(c.offerReceive(100) == [])
        #expect(c.send(1, m1, wait: true) == [.propose(offer: 100, message: m1, closed: false)])
        #expect(c.receive(2, wait: true) == [], "while a proposal is out, others queue")
        #expect(c.send(3, m2, wait: true) == [])
        #expect(c.resolve(100, accepted: true) == [.sent(1), .received(2, m2), .sent(3)])
        #expect(c.sends == 2 && c.receives == 2)
    }

    @Test("refused, the match is undone: the message goes to the next receiver, in order, and nothing is lost")
    func refusedReceive() {
        var c = ChannelCore(capacity: 2)
        _ = c.send(1, m1, wait: true)
        _ = c.send(2, m2, wait: true)
        #expect(c.offerReceive(100) == [.propose(offer: 100, message: m1, closed: false)])
        #expect(c.receive(3, wait: true) == [], "the head is out on proposal: a receiver waits for it")
        #expect(c.resolve(100, accepted: false) == [.received(3, m1)])
        #expect(c.receive(4, wait: true) == [.received(4, m2)])
        #expect(c.buffered == 0 && c.waitingReceivers == 0)
    }

    @Test("a send offer goes into room in the buffer once accepted, and leaves nothing if refused")
    func sendOffer() {
        var c = ChannelCore(capacity: 1)
        #expect(c.offerSend(100, m1) == [.propose(offer: 100, message: nil, closed: false)])
        #expect(c.resolve(100, accepted: true) == [])
        #expect(c.buffered == 1)
        var d = ChannelCore(capacity: 0)
        _ = d.receive(1, wait: true)
        #expect(d.offerSend(100, m2) == [.propose(offer: 100, message: nil, closed: false)])
        #expect(d.resolve(100, accepted: false) == [])
        #expect(d.waitingReceivers == 1, "the receiver waits on")
        #expect(d.send(2, m3, wait: true) == [.received(1, m3), .sent(2)])
    }

    @Test("two offers never match each other; a plain waiter behind them still matches")
    func offersDoNotPair() {
        var c = ChannelCore(capacity: 0)
        _ = c.offerReceive(100)
        #expect(c.offerSend(200, m1) == [])
        #expect(c.receive(1, wait: true) == [.propose(offer: 200, message: nil, closed: false)])
        #expect(c.resolve(200, accepted: true) == [.received(1, m1)])
        #expect(c.waitingReceivers == 1, "the receive offer still waits")
    }

    @Test("a try, or a waiter that gave up, caught in a proposal that is refused leaves instead of going back into the queue")
    func leavingWaiters() {
        var c = ChannelCore(capacity: 0)
        _ = c.offerSend(100, m1)
        // A try-receive meets the send offer: it waits for the select's answer, not for a partner.
        #expect(c.receive(1, wait: false) == [.propose(offer: 100, message: nil, closed: false)])
        #expect(c.resolve(100, accepted: false) == [.failed(1, .wouldBlock)])
        #expect(c.waitingReceivers == 0, "not queued as a blocking receiver")
        // A blocking receiver whose client goes while the proposal is out.
        _ = c.offerSend(200, m2)
        _ = c.receive(2, wait: true)
        let cancelled = c.cancel(2)
        #expect(!cancelled, "part of the proposal: the answer settles it")
        #expect(c.resolve(200, accepted: false) == [.failed(2, .wouldBlock)])
        #expect(c.send(3, m3, wait: false) == [.failed(3, .wouldBlock)], "nobody is left waiting to swallow a message")
    }

    @Test("a try-receive while the last message of a closed channel is out on proposal would block; it is not told closed")
    func closedButProposing() {
        var c = ChannelCore(capacity: 1)
        _ = c.send(1, m1, wait: true)
        _ = c.close()
        #expect(c.offerReceive(100) == [.propose(offer: 100, message: m1, closed: false)])
        #expect(c.receive(2, wait: false) == [.failed(2, .wouldBlock)])
        #expect(c.resolve(100, accepted: false) == [])
        #expect(c.receive(3, wait: false) == [.received(3, m1)], "the message came back, and is received")
    }

    @Test("closing fires receive offers as closed, fails send offers, and a withdrawn offer takes nothing")
    func closeAndWithdraw() {
        var c = ChannelCore(capacity: 0)
        _ = c.offerReceive(100)
        _ = c.offerSend(200, m1)
        #expect(c.close() == [.failed(200, .closed), .propose(offer: 100, message: nil, closed: true)])
        var d = ChannelCore(capacity: 0)
        _ = d.offerReceive(100)
        let withdrawn = d.cancel(100)
        #expect(withdrawn)
        #expect(d.send(1, m1, wait: false) == [.failed(1, .wouldBlock)])
    }
}

/// The shell over real tasks and continuations; the element is looked up by a closure, not over the network.
@Suite("Channels: the owning host's shell")
struct ChannelsTests {
    static func channels(capacity: UInt32 = 0, maxBuffered: Int = 1 << 20) -> Channels {
        Channels(maxMessageBytes: 16, maxBufferedBytes: maxBuffered) { path in
            guard path.hasSuffix("/c") else { return nil }
            var view = ElementView(kind: "chan")
            view.capacity = capacity
            view.createRevision = 7
            return view
        }
    }

    /// The create revision a test's lookup reports, moved to play a removal and a new channel at the path.
    final class Revision: Sendable {
        private let value: Mutex<UInt64>
        init(_ revision: UInt64) { value = Mutex(revision) }
        var current: UInt64 { value.withLock { $0 } }
        func set(_ revision: UInt64) { value.withLock { $0 = revision } }
    }

    /// Channels whose lookup finds a channel of `capacity` at any path, created at `created`'s revision.
    static func channels(capacity: UInt32, created: Revision) -> Channels {
        Channels(maxMessageBytes: 16, maxBufferedBytes: 1 << 20) { _ in
            var view = ElementView(kind: "chan")
            view.capacity = capacity
            view.createRevision = created.current
            return view
        }
    }

    /// A channel made at revision 7 and full (messages 1, 2, ... up to `capacity`), with a sender waiting for room.
    static func fullChannelWithWaitingSender(
        capacity: UInt32
    ) async throws -> (Revision, Channels, String, Task<ChanStatView, any Error>) {
        let created = Revision(7)
        let ch = channels(capacity: capacity, created: created)
        let path = "/X0000000000000001/c"
        _ = try await ch.send(path, [1], wait: true, created: 7)
        for m in 1..<UInt8(capacity) { _ = try await ch.send(path, [m + 1], wait: true) }
        let stuck = Task { try await ch.send(path, [0], wait: true) }
        try await eventually("a sender waiting on the old channel") { (try? await ch.stat(path))?.waitingSenders == 1 }
        return (created, ch, path, stuck)
    }

    static func code(_ body: () async throws -> Void) async -> String? {
        do { try await body() } catch { return (error as? APIError)?.code ?? "\(error)" }
        return nil
    }

    @Test("a blocked receive is answered by a later send, with the bytes sent")
    func blockedReceive() async throws {
        let ch = Self.channels()
        let receiver = Task { try await ch.receive("/X0000000000000001/c", wait: true) }
        try await eventually("the receiver waiting") { (try? await ch.stat("/X0000000000000001/c"))?.waitingReceivers == 1 }
        _ = try await ch.send("/X0000000000000001/c", [9, 9], wait: true)
        #expect(try await receiver.value == [9, 9])
    }

    @Test("a receive cancelled while it waits leaves the queue: the next message goes to the next receiver")
    func cancelledReceive() async throws {
        let ch = Self.channels()
        let path = "/X0000000000000001/c"
        let first = Task { try await ch.receive(path, wait: true) }
        try await eventually("the first receiver waiting") { (try? await ch.stat(path))?.waitingReceivers == 1 }
        first.cancel()
        try await eventually("the cancelled receiver gone") { (try? await ch.stat(path))?.waitingReceivers == 0 }
        let second = Task { try await ch.receive(path, wait: true) }
        try await eventually("the second receiver waiting") { (try? await ch.stat(path))?.waitingReceivers == 1 }
        _ = try await ch.send(path, [5], wait: true)
        #expect(try await second.value == [5])
        #expect((try? await first.value) == nil, "the cancelled receive got nothing")
    }

    @Test("a message of 256 KiB or more tells the allocator to keep free memory for the next; a smaller one does not")
    func largeMessagesAreNoted() async throws {
        let noted = Atomic(0)
        let ch = Channels(maxMessageBytes: 1 << 20, maxBufferedBytes: 8 << 20, lookup: { _ in
            var view = ElementView(kind: "chan")
            view.capacity = 8
            view.createRevision = 7
            return view
        }, largeMessage: { noted.add(1, ordering: .relaxed) })
        for size in [64, (256 << 10) - 1, 256 << 10, 1 << 20] {
            _ = try await ch.send("/X0000000000000001/c", ChanMessage(ByteBuffer(repeating: 1, count: size)), wait: true)
        }
        #expect(noted.load(ordering: .relaxed) == 2)
    }

    @Test("errors name what was wrong: no such element, a message too large, a full host, a removed channel")
    func errors() async throws {
        let ch = Self.channels(capacity: 4, maxBuffered: 20)
        let path = "/X0000000000000001/c"
        #expect(await Self.code { _ = try await ch.send("/X0000000000000001/none", [1], wait: true) } == "not_found")
        #expect(await Self.code { _ = try await ch.send(path, ChanMessage(ByteBuffer(repeating: 0, count: 17)), wait: true) } == "too_large")
        _ = try await ch.send(path, ChanMessage(ByteBuffer(repeating: 0, count: 16)), wait: true)
        #expect(await Self.code { _ = try await ch.send(path, ChanMessage(ByteBuffer(repeating: 0, count: 8)), wait: true) } == "buffers_full")
        #expect(try await ch.receive(path, wait: false).byteCount == 16)
        #expect(await Self.code { _ = try await ch.receive(path, wait: false) } == "would_block")
        let waiting = Task { try await ch.receive(path, wait: true) }
        try await eventually("the receiver waiting") { (try? await ch.stat(path))?.waitingReceivers == 1 }
        ch.removed(path)
        #expect(await Self.code { _ = try await waiting.value } == "gone")
        _ = try await ch.close(path)  // taken on again: its element is still there as far as the lookup knows
        #expect(await Self.code { _ = try await ch.close(path) } == "closed")
        #expect(await Self.code { _ = try await ch.send(path, [1], wait: true) } == "closed")
    }

    @Test("a client that names the channel's create revision reaches that channel: an older one still here (its removal not told yet) is dropped with its waiters; a newer one answers gone")
    func namedChannel() async throws {
        let (created, ch, path, stuck) = try await Self.fullChannelWithWaitingSender(capacity: 4)
        // Removed and made again at revision 9; this host's watch has not told it yet.
        created.set(9)
        #expect(try await ch.stat(path).buffered == 4, "a client that names no revision still gets the channel here")
        _ = try await ch.send(path, [5], wait: true, created: 9)
        #expect(await Self.code { _ = try await stuck.value } == "gone", "the old channel's waiter fails as its removal would fail it")
        #expect(try await ch.stat(path, created: 9).buffered == 1, "the old channel's messages went with it")
        #expect(Array(buffer: try await ch.receive(path, wait: false, created: 9).gathered) == [5])
        #expect(await Self.code { _ = try await ch.send(path, [6], wait: true, created: 7) } == "gone", "the channel made at 7 is gone")
        #expect(await Self.code { _ = try await ch.receive(path, wait: false, created: 7) } == "gone")
        ch.removed(path, at: 8)  // the old one's removal, told late: the new one stays
        _ = try await ch.send(path, [7], wait: true, created: 9)
        #expect(try await ch.stat(path, created: 9).buffered == 1)
    }

    @Test("a select's offer that names the channel's create revision reaches that channel as a client's call does: an older one still here is dropped with its waiters, and the offer waits in the new one; a newer one answers gone")
    func namedChannelOffer() async throws {
        let (created, ch, path, stuck) = try await Self.fullChannelWithWaitingSender(capacity: 1)
        created.set(9)  // removed and made again at 9; the watch has not told this host yet
        let offer = Channels.Offer(coordinator: "127.0.0.1:1", select: "/X0000000000000002/s", run: "1", clause: 0, receiving: true)
        #expect(try await ch.offer(path, offer, sending: nil, created: 9) == false, "the new channel is empty: nothing to propose")
        #expect(await Self.code { _ = try await stuck.value } == "gone", "the old channel's waiter fails as its removal would fail it")
        #expect(try await ch.stat(path).buffered == 0, "the old channel's message went with it")
        var older = offer
        older.run = "2"
        #expect(await Self.code { _ = try await ch.offer(path, older, sending: nil, created: 7) } == "gone", "the channel made at 7 is gone")
        #expect(await Self.code { _ = try await ch.offer(path, older, sending: [3], created: 7) } == "gone")
        // A revision that names no channel (later than the one there, which the cluster still has) leaves the live
        // channel and its messages alone.
        _ = try await ch.send(path, [4], wait: true)
        var wrong = offer
        wrong.run = "3"
        #expect(await Self.code { _ = try await ch.offer(path, wrong, sending: nil, created: 12) } == "gone")
        #expect(await Self.code { _ = try await ch.send(path, [5], wait: false, created: 12) } == "gone")
        #expect(try await ch.stat(path).buffered == 1, "the live channel kept its message")
    }

    @Test("a removal told late (by a lagging watch) leaves a newer channel at the path alone; so does a scan for one created after it; an older subscription's entry gives way to a newer one's events")
    func lateRemovals() async throws {
        let ch = Self.channels(capacity: 4)
        let path = "/X0000000000000001/c"  // created at revision 7, as far as the lookup knows
        _ = try await ch.send(path, [1], wait: true)
        ch.removed(path, at: 7)
        #expect(try await ch.stat(path).buffered == 1, "an element removed at 7 was not this one, created at 7")
        ch.keep(only: [:], listedAt: 6)
        #expect(try await ch.stat(path).buffered == 1, "a scan as of 6 knows nothing of a channel created at 7")
        ch.keep(only: [path: 7], listedAt: 9)
        #expect(try await ch.stat(path).buffered == 1, "listed by the scan")
        ch.removed(path, at: 8)
        #expect(try await ch.stat(path).buffered == 0, "removed, and taken on again empty")
        _ = try await ch.send(path, [2], wait: true)
        ch.keep(only: [:], listedAt: 9)
        #expect(try await ch.stat(path).buffered == 0, "not in a scan as of 9: removed")

        let feed = "/X0000000000000001/s"
        #expect(ch.deliver(feed, createRevision: 5, Array("/old".utf8)))
        #expect(ch.deliver(feed, createRevision: 9, Array("/new".utf8)), "the newer subscription's event is taken")
        ch.removed(feed, at: 6)  // the older one's removal, told late
        #expect(Array(buffer: try await ch.receive(feed, wait: false).gathered) == Array("/new".utf8))
        #expect(await Self.code { _ = try await ch.receive(feed, wait: false) } == "would_block")
    }
}
