import Testing

@testable import CircuitRaft

/// Three nodes with `RaftConfig.asyncStorageWrites`, driven by hand: a batch handed to the store stays on its way
/// (its messages held back) until the test completes that node's writes; the report reaches the protocol at the
/// node's next flush, as the driver's writer reports through the inbox.
private struct AsyncCluster {
    var h: Harness
    /// Per node: batches handed over and not yet durable, in order.
    var writing: [NodeID: [(last: Entry?, epoch: UInt64, messages: [Message])]] = [:]
    /// Per node: batches durable and not yet reported: their last entry and epoch.
    var reports: [NodeID: [(Entry, UInt64)]] = [:]
    /// Per node: every Ready's `persistInline`, in order.
    var inline: [NodeID: [Bool]] = [:]
    /// Per node: every batch of entries handed out, in order.
    var handed: [NodeID: [[Entry]]] = [:]

    init() throws {
        h = try Harness(3) {
            $0.asyncStorageWrites = true
            $0.preVote = false
        }
    }

    /// Reports what is durable, then takes every Ready: an inline one waits for the writes before it (as
    /// `waitForWrites`) and is durable at once; the others are handed to the writer.
    mutating func flush() {
        for id in h.nodes.keys.sorted() {
            for (last, epoch) in reports[id, default: []] {
                h.nodes[id]!.persisted(through: last.index, term: last.term, epoch: epoch)
            }
            reports[id] = []
            while h.nodes[id]!.hasReady {
                let rd = h.nodes[id]!.ready()
                inline[id, default: []].append(rd.persistInline)
                if !rd.entries.isEmpty { handed[id, default: []].append(rd.entries) }
                h.mailbox.append(contentsOf: rd.messagesBeforePersist)
                if rd.persistInline {
                    completeWrites(id)
                    h.mailbox.append(contentsOf: rd.messages)
                } else {
                    writing[id, default: []].append((rd.entries.last, rd.epoch, rd.messages))
                }
                h.applied[id, default: []].append(contentsOf: rd.committedEntries)
                h.nodes[id]!.advance(rd)
            }
        }
    }

    /// The node's writes become durable: their messages go out and their reports wait for its next flush.
    mutating func completeWrites(_ id: NodeID) {
        for write in writing[id, default: []] {
            h.mailbox.append(contentsOf: write.messages)
            if let last = write.last { reports[id, default: []].append((last, write.epoch)) }
        }
        writing[id] = []
    }

    /// Delivers what is in the mailbox (and what that provokes) until nothing is left to deliver.
    mutating func deliver() {
        flush()
        while !h.mailbox.isEmpty {
            let batch = h.mailbox
            h.mailbox.removeAll()
            for m in batch { h.nodes[m.to]?.step(m) }
            flush()
        }
    }

    /// Three nodes, node 1 elected.
    static func led() throws -> AsyncCluster {
        var c = try AsyncCluster()
        c.electOne()
        return c
    }

    /// Elects node 1 with every write completed as it goes, then settles.
    mutating func electOne() {
        h[1].campaign()
        for _ in 0..<6 {
            deliver()
            for id in h.nodes.keys { completeWrites(id) }
        }
        deliver()
    }

    mutating func propose(_ text: String) -> UInt64 {
        guard case .success(let ticket) = h.propose(1, text) else { preconditionFailure("node 1 does not lead") }
        return ticket.firstIndex
    }
}

@Suite("Raft with asynchronous storage writes")
struct AsyncStorageWritesRules {
    @Test("a term or vote that changed is persisted inline; the entries of a steady leader are not")
    func inlineOnlyForTermAndVote() throws {
        var c = try AsyncCluster.led()
        #expect(c.h[1].role == .leader)
        // The campaign changed node 1's term and vote: that Ready was inline.
        #expect(c.inline[1]?.first == true)
        let before = c.inline[1]!.count
        _ = c.propose("a")
        c.flush()
        #expect(c.inline[1]!.count == before + 1)
        #expect(c.inline[1]!.last == false)
    }

    @Test("entries handed to the store are not handed out again while their write is under way")
    func handedOutOnce() throws {
        var c = try AsyncCluster.led()
        let a = c.propose("a")
        c.flush()
        let b = c.propose("b")
        c.flush()
        #expect(c.handed[1]!.suffix(2).map { $0.map(\.index) } == [[a], [b]])
        #expect(c.h[1].stableIndex < a)
    }

    @Test("the leader counts itself toward a quorum only once its own write is reported")
    func leaderCountsItselfWhenDurable() throws {
        var c = try AsyncCluster.led()
        let index = c.propose("x")
        c.deliver()  // the appends reach both followers, whose writes are under way
        c.completeWrites(2)
        c.deliver()  // node 2's acknowledgement reaches the leader
        #expect(c.h[1].commitIndex < index, "committed with one durable copy of three")
        c.completeWrites(1)
        c.deliver()
        #expect(c.h[1].commitIndex >= index)
        #expect(c.h.applied[1]!.contains { $0.index == index })
    }

    @Test("a follower acknowledges entries only once they are durable")
    func followerAcknowledgesWhenDurable() throws {
        var c = try AsyncCluster.led()
        let index = c.propose("y")
        c.flush()
        let appends = c.h.mailbox.filter { $0.kind == .append && $0.to == 2 }
        #expect(!appends.isEmpty, "the leader sends its appends before its own write is durable")
        c.h.mailbox.removeAll()
        for m in appends { c.h[2].step(m) }
        c.flush()
        #expect(!c.h.mailbox.contains { $0.kind == .appendResponse && $0.index >= index })
        c.completeWrites(2)
        #expect(c.h.mailbox.contains { $0.kind == .appendResponse && $0.from == 2 && $0.index >= index && !$0.reject })
    }

    @Test("a follower applies committed entries only as far as they are durable on it")
    func followerAppliesWhenDurable() throws {
        var c = try AsyncCluster.led()
        let index = c.propose("z")
        c.deliver()
        c.completeWrites(1)
        c.completeWrites(2)
        c.deliver()  // committed by nodes 1 and 2; node 3 hears of the commit with its write still under way
        #expect(c.h[1].commitIndex >= index)
        c.h.tick(1, times: 1)  // a heartbeat carries the commit index to node 3
        c.deliver()
        #expect(c.h[3].commitIndex >= index)
        #expect(!c.h.applied[3, default: []].contains { $0.index == index })
        c.completeWrites(3)
        c.deliver()
        #expect(c.h.applied[3, default: []].contains { $0.index == index })
    }

    @Test("a report of a write whose entries were replaced since moves nothing, even if an entry of the same index and term came back (A, B, A)")
    func staleReportIgnored() {
        var log = RaftLog()
        log.append([Entry(term: 1, index: 1), Entry(term: 1, index: 2), Entry(term: 1, index: 3)])
        log.handedOut(through: 3)  // write A: entries 1 to 3 of term 1
        let epochA = log.epoch
        _ = log.merge(after: 1, new: [Entry(term: 2, index: 2)])  // a leader of term 2 replaces 2 and 3
        #expect(log.handedOut == 1)
        log.handedOut(through: 2)  // write B
        _ = log.merge(after: 1, new: [Entry(term: 1, index: 2), Entry(term: 1, index: 3)])  // term 1's entries again
        log.handedOut(through: 3)  // write A', not durable yet
        log.persisted(through: 3, term: 1, epoch: epochA)  // A's report comes late
        #expect(log.stable == 0, "A's report claimed entries its write no longer stands for")
        log.persisted(through: 3, term: 1, epoch: log.epoch)  // A''s report
        #expect(log.stable == 3)
    }

    @Test("a report never marks entries stable beyond those handed to the store")
    func reportBoundedByHandedOut() {
        var log = RaftLog()
        log.append([Entry(term: 1, index: 1), Entry(term: 1, index: 2)])
        log.handedOut(through: 1)
        log.persisted(through: 2, term: 1, epoch: log.epoch)
        #expect(log.stable == 0)
        log.persisted(through: 1, term: 1, epoch: log.epoch)
        #expect(log.stable == 1)
    }
}
