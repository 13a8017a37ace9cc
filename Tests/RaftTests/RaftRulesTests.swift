import Testing

@testable import CircuitRaft

/// A few `Raft` values wired together by hand: messages are delivered only when a test says so, and every Ready is
/// treated as persisted at once.
struct Harness {
    var nodes: [NodeID: Raft] = [:]
    /// Messages sent and not yet delivered, in order.
    var mailbox: [Message] = []
    var applied: [NodeID: [Entry]] = [:]
    var readStates: [NodeID: [ReadState]] = [:]
    var droppedReads: [NodeID: [UInt64]] = [:]
    var placed: [NodeID: [ForwardedProposal]] = [:]
    var refused: [NodeID: [UInt64]] = [:]
    var unknown: [NodeID: [UInt64]] = [:]

    init(_ count: Int, configure: (inout RaftConfig) -> Void = { _ in }) throws {
        let voters = (1...count).map { NodeID($0) }
        for id in voters {
            var c = RaftConfig(id: id, voters: voters)
            configure(&c)
            nodes[id] = try Raft(config: c)
        }
    }

    subscript(_ id: NodeID) -> Raft {
        get { nodes[id]! }
        set { nodes[id] = newValue }
    }

    /// Takes each node's Ready (as if persisted), queueing its messages.
    mutating func flush() {
        for id in nodes.keys.sorted() {
            while nodes[id]!.hasReady {
                let rd = nodes[id]!.ready()
                mailbox.append(contentsOf: rd.messagesBeforePersist)
                mailbox.append(contentsOf: rd.messages)
                applied[id, default: []].append(contentsOf: rd.committedEntries)
                readStates[id, default: []].append(contentsOf: rd.readStates)
                droppedReads[id, default: []].append(contentsOf: rd.droppedReads)
                placed[id, default: []].append(contentsOf: rd.proposalsPlaced)
                refused[id, default: []].append(contentsOf: rd.proposalsRefused)
                unknown[id, default: []].append(contentsOf: rd.proposalsUnknown)
                nodes[id]!.advance(rd)
            }
        }
    }

    /// Takes the queued messages (after a flush).
    mutating func take(where filter: (Message) -> Bool = { _ in true }) -> [Message] {
        flush()
        let taken = mailbox.filter(filter)
        mailbox.removeAll(where: filter)
        return taken
    }

    /// Delivers messages until none are left, dropping those `drop` selects. Returns how many were delivered.
    @discardableResult
    mutating func stabilize(drop: (Message) -> Bool = { _ in false }) -> Int {
        var delivered = 0
        flush()
        while !mailbox.isEmpty {
            let batch = mailbox
            mailbox.removeAll()
            for m in batch where !drop(m) {
                nodes[m.to]?.step(m)
                delivered += 1
            }
            flush()
        }
        return delivered
    }

    mutating func elect(_ id: NodeID) {
        nodes[id]!.campaign()
        stabilize()
    }

    mutating func tick(_ id: NodeID, times: Int) {
        for _ in 0..<times { nodes[id]!.tick() }
    }

    mutating func propose(_ id: NodeID, _ text: String) -> Result<ProposalTicket, RaftRefusal> {
        nodes[id]!.propose([Array(text.utf8)])
    }
}

/// The ways a follower (node 2, following node 1) gives up on what it asked of its leader: it hears of a new term,
/// its connection to the leader closes, or no answer comes within its patience (the ask or its answer was lost): an
/// election timeout for reads, three for proposals. One tick less is not enough.
enum GiveUp: CaseIterable, Sendable {
    case newTerm, leaderUnreachable, timeout

    func happen(to h: inout Harness, patience: Int) {
        switch self {
        case .newTerm: h[2].step(Message(kind: .heartbeat, from: 3, to: 2, term: h[2].term + 1))
        case .leaderUnreachable: h[2].peerUnreachable(1)
        case .timeout:
            for _ in 0..<(patience - 1) {
                h[2].tick()
                // Heard from: the follower does not campaign meanwhile.
                h[2].step(Message(kind: .heartbeat, from: 1, to: 2, term: h[2].term, commit: h[2].commitIndex))
            }
            h.flush()
            precondition(h.droppedReads[2, default: []].isEmpty && h.unknown[2, default: []].isEmpty, "given up too early")
            h.tick(2, times: 1)
        }
        h.flush()
    }
}

@Suite("Raft §5.2: leader election")
struct ElectionRules {
    @Test("a follower that hears nothing for its randomised timeout campaigns in the next term")
    func followerTimesOut() throws {
        var h = try Harness(3) { $0.preVote = false }
        h.tick(1, times: 2 * h[1].config.electionTicks)
        #expect(h[1].role == .candidate)
        #expect(h[1].term == 1)
        #expect(h[1].vote == 1)
        let requests = h.take()
        #expect(Set(requests.map(\.to)) == [2, 3])
        #expect(requests.allSatisfy { $0.kind == .vote && $0.term == 1 })
    }

    @Test("timeouts are drawn from [election, 2 × election) ticks and differ between nodes")
    func randomisedTimeouts() throws {
        var firsts: Set<Int> = []
        for id in NodeID(1)...8 {
            var c = RaftConfig(id: id, voters: Array(1...8))
            c.preVote = false
            var r = try Raft(config: c)
            var ticks = 0
            while r.role == .follower {
                r.tick()
                ticks += 1
            }
            #expect(ticks >= c.electionTicks && ticks < 2 * c.electionTicks)
            firsts.insert(ticks)
        }
        #expect(firsts.count > 1)
    }

    @Test("a candidate with a majority of votes leads and appends a no-op of its term")
    func majorityElects() throws {
        var h = try Harness(3) { $0.preVote = false }
        h.elect(1)
        #expect(h[1].role == .leader)
        #expect(h[2].leader == 1 && h[3].leader == 1)
        let noop = h.applied[1]!.last!
        #expect(noop.kind == .noop && noop.term == h[1].term)
        #expect(h[1].commitIndex == 1)
    }

    @Test("a node grants one vote per term, to the first candidate that asks")
    func oneVotePerTerm() throws {
        var h = try Harness(3) { $0.preVote = false; $0.checkQuorum = false }
        h[3].step(Message(kind: .vote, from: 1, to: 3, term: 1))
        h[3].step(Message(kind: .vote, from: 2, to: 3, term: 1))
        let answers = h.take()
        #expect(answers.map(\.to) == [1, 2])
        #expect(answers.map(\.reject) == [false, true])
        #expect(h[3].vote == 1)
    }

    @Test("a candidate that hears from a leader of its term becomes a follower")
    func candidateYieldsToLeader() throws {
        var h = try Harness(3) { $0.preVote = false }
        h.tick(2, times: 20)
        #expect(h[2].role == .candidate)
        let term = h[2].term
        h[2].step(Message(kind: .append, from: 1, to: 2, term: term))
        #expect(h[2].role == .follower)
        #expect(h[2].leader == 1)
    }

    @Test("a split vote is retried in a later term after another timeout")
    func splitVoteRetries() throws {
        var h = try Harness(4) { $0.preVote = false; $0.checkQuorum = false }
        h[1].campaign()
        h[2].campaign()
        // Each gets one other vote (3 → 1, 4 → 2): no majority of 4.
        h.stabilize(drop: { ($0.kind == .vote && ($0.from == 1 && $0.to != 3 || $0.from == 2 && $0.to != 4)) })
        #expect(h[1].role == .candidate && h[2].role == .candidate)
        h.tick(1, times: 2 * h[1].config.electionTicks)
        #expect(h[1].term == 2 || h[1].role != .candidate)
        h.stabilize()
        #expect(h.nodes.values.filter { $0.role == .leader }.count == 1)
    }

    @Test("a message from an older term is answered with the current term, and a stale leader steps down")
    func staleLeaderStepsDown() throws {
        var h = try Harness(3)
        h.elect(1)
        // 2 and 3 move on to term 5 without 1.
        h[2].step(Message(kind: .append, from: 3, to: 2, term: 5))
        h.mailbox.removeAll()
        h[2].step(Message(kind: .heartbeat, from: 1, to: 2, term: h[1].term))
        let answer = h.take(where: { $0.to == 1 })
        #expect(answer.count == 1 && answer[0].term == 5)
        h[1].step(answer[0])
        #expect(h[1].role == .follower && h[1].term == 5)
    }
}

@Suite("Raft §5.3: log replication")
struct ReplicationRules {
    @Test("an entry commits once a majority has persisted it, and followers learn the commit")
    func commitOnMajority() throws {
        var h = try Harness(3)
        h.elect(1)
        guard case .success(let t) = h.propose(1, "x") else { Issue.record("refused"); return }
        // Only node 2 receives the append: 2 of 3 is a majority.
        h.stabilize(drop: { $0.to == 3 })
        #expect(h[1].commitIndex == t.lastIndex)
        #expect(h.applied[1]!.last!.data == Array("x".utf8))
        // Node 3 lost its append: within a few heartbeat rounds the leader notices and repairs it.
        for _ in 0..<(Raft.stalledRoundsBeforeProbe + 2) {
            h.tick(1, times: 1)
            h.stabilize()
        }
        #expect(h[2].commitIndex == t.lastIndex && h[3].commitIndex == t.lastIndex)
    }

    @Test("a leader counts its own log only once it is durable")
    func leaderWaitsForOwnPersist() throws {
        var h = try Harness(1)
        h.elect(1)
        _ = h.propose(1, "y")
        let before = h[1].commitIndex
        let rd = h.nodes[1]!.ready()
        #expect(rd.entries.count == 1)
        #expect(h[1].commitIndex == before)
        h.nodes[1]!.advance(rd)
        #expect(h[1].commitIndex == before + 1)
    }

    @Test("a leader's appends may leave before its own fsync; a follower's acknowledgement may not")
    func appendsBeforePersist() throws {
        var h = try Harness(3)
        h.elect(1)
        _ = h.propose(1, "q")
        let rd = h.nodes[1]!.ready()
        #expect(!rd.entries.isEmpty)
        #expect(rd.messagesBeforePersist.count == 2)
        #expect(rd.messagesBeforePersist.allSatisfy { $0.kind == .append })
        h.nodes[1]!.advance(rd)
        h[2].step(rd.messagesBeforePersist.first { $0.to == 2 }!)
        let followerReady = h.nodes[2]!.ready()
        #expect(followerReady.messagesBeforePersist.isEmpty)
        #expect(followerReady.messages.contains { $0.kind == .appendResponse })
        h.nodes[2]!.advance(followerReady)
    }

    @Test("a change of the commit index alone needs no fsync; term and vote changes do")
    func commitAloneIsNotSynced() throws {
        var h = try Harness(3)
        h.elect(1)
        _ = h.propose(1, "c")
        // Node 2 gets the entry but not the empty append that spreads the new commit index.
        h.stabilize(drop: { $0.to == 2 && $0.kind == .append && $0.entries.isEmpty })
        // A heartbeat now raises its commit index, and only that.
        h.tick(1, times: 1)
        let heartbeat = h.take(where: { $0.kind == .heartbeat && $0.to == 2 }).first!
        let before = h[2].commitIndex
        h[2].step(heartbeat)
        #expect(h[2].commitIndex > before)
        let rd = h.nodes[2]!.ready()
        #expect(rd.hardState == nil)
        #expect(!rd.mustSync)
        h.nodes[2]!.advance(rd)
        h[2].step(Message(kind: .append, from: 3, to: 2, term: h[2].term + 1))
        let termChange = h.nodes[2]!.ready()
        #expect(termChange.hardState?.term == h[2].term)
        #expect(termChange.mustSync)
    }

    @Test("a follower refuses an append whose previous entry does not match, and the leader repairs it")
    func consistencyCheck() throws {
        var h = try Harness(3)
        h.elect(1)
        for i in 0..<5 { _ = h.propose(1, "a\(i)") }
        h.stabilize(drop: { $0.to == 3 })
        // Node 3 missed everything after the no-op: the next append does not match.
        _ = h.propose(1, "b")
        let toThree = h.take(where: { $0.to == 3 && $0.kind == .append })
        #expect(!toThree.isEmpty)
        h[3].step(toThree.last!)
        let answer = h.take(where: { $0.from == 3 })
        #expect(answer.first?.reject == true)
        h.stabilize()
        #expect(h[3].lastIndex == h[1].lastIndex)
        #expect(h[3].log.entries == h[1].log.entries)
    }

    @Test("conflicting uncommitted entries are replaced, and the back-off skips a whole term per round trip")
    func conflictTruncation() throws {
        var h = try Harness(3) { $0.checkQuorum = false }
        h.elect(1)
        // Leader 1 appends 20 entries that only it has, then is cut off.
        for i in 0..<20 { _ = h.propose(1, "lost\(i)") }
        h.mailbox.removeAll()
        h.flush()
        h.mailbox.removeAll()
        // Node 2 leads a later term with 3 and commits something else.
        h[2].campaign()
        h.stabilize(drop: { $0.to == 1 || $0.from == 1 })
        #expect(h[2].role == .leader)
        _ = h.propose(2, "kept")
        h.stabilize(drop: { $0.to == 1 || $0.from == 1 })
        // Reconnect 1: count the rejected appends it answers.
        h.tick(2, times: 1)
        var rejections = 0
        h.stabilize(drop: { m in
            if m.from == 1 && m.kind == .appendResponse && m.reject { rejections += 1 }
            return false
        })
        #expect(h[1].log.entries == h[2].log.entries)
        #expect(!h[1].log.entries.contains { $0.data == Array("lost0".utf8) })
        #expect(rejections <= 2, "\(rejections) round trips to repair one divergent term")
    }

    @Test("in replicate state the leader pipelines appends up to the in-flight window")
    func pipelining() throws {
        var h = try Harness(2) { $0.maxInflightMessages = 3 }
        h.elect(1)
        for i in 0..<10 {
            _ = h.propose(1, "p\(i)")
            h.flush()
        }
        let appends = h.take(where: { $0.kind == .append && $0.to == 2 })
        #expect(appends.count == 3, "window of 3, sent \(appends.count)")
        for m in appends { h[2].step(m) }
        h.stabilize()
        #expect(h[2].lastIndex == h[1].lastIndex)
    }

    @Test("one append carries many proposals, bounded by the byte limit")
    func batching() throws {
        var h = try Harness(2) { $0.maxBytesPerMessage = 64 * 40 }
        h.elect(1)
        _ = h[1].propose((0..<100).map { _ in [UInt8](repeating: 7, count: 40) })
        let appends = h.take(where: { $0.kind == .append })
        #expect(appends.count >= 2)
        #expect(appends[0].entries.count > 1)
        #expect(appends.allSatisfy { $0.entries.reduce(0) { $0 + $1.byteSize } <= 64 * 40 })
    }

    @Test("proposals to a follower are refused naming the leader; oversized entries are refused")
    func proposalRefusals() throws {
        var h = try Harness(3) { $0.maxEntryBytes = 10 }
        h.elect(1)
        #expect(throws: RaftRefusal.notLeader(leader: 1)) { try h.propose(2, "z").get() }
        #expect(throws: RaftRefusal.entryTooLarge(size: 11, limit: 10)) { try h.propose(1, "01234567890").get() }
        #expect(RaftRefusal.notLeader(leader: 1).description == "not the leader; the leader is 1")
    }
}

@Suite("Raft §5.4: safety")
struct SafetyRules {
    @Test(
        "a voter refuses a candidate whose log is less up to date",
        arguments: [
            // (voter's last term, voter's last index, candidate's last term, candidate's last index, granted)
            (2, 5, 1, 9, false), (2, 5, 2, 4, false), (2, 5, 2, 5, true), (2, 5, 3, 1, true),
        ] as [(UInt64, UInt64, UInt64, UInt64, Bool)])
    func electionRestriction(voterTerm: UInt64, voterIndex: UInt64, candTerm: UInt64, candIndex: UInt64, granted: Bool)
        throws
    {
        let entries = (1...voterIndex).map { Entry(term: $0 == voterIndex ? voterTerm : 1, index: $0) }
        var c = RaftConfig(id: 2, voters: [1, 2, 3])
        c.preVote = false
        var voter = try Raft(config: c, hardState: HardState(term: voterTerm), entries: entries)
        voter.step(Message(kind: .vote, from: 1, to: 2, term: 10, logTerm: candTerm, index: candIndex))
        let rd = voter.ready()
        #expect(rd.messages.count == 1)
        #expect(rd.messages[0].reject == !granted)
        #expect((rd.hardState?.vote == 1) == granted)
    }

    @Test("Figure 8: a leader does not commit an earlier term's entry by counting replicas")
    func figure8() throws {
        // Node 1 leads term 2 and holds an entry of term 2 at index 1 that node 2 also holds; node 1 then
        // leads term 4 after being re-elected. The entry is on a majority but must not commit until an entry
        // of term 4 does.
        var c1 = RaftConfig(id: 1, voters: [1, 2, 3])
        c1.preVote = false
        var leader = try Raft(config: c1, hardState: HardState(term: 3), entries: [Entry(term: 2, index: 1)])
        leader.campaign()
        var rd = leader.ready()
        leader.advance(rd)
        leader.step(Message(kind: .voteResponse, from: 2, to: 1, term: 4))
        #expect(leader.role == .leader)
        rd = leader.ready()
        leader.advance(rd)  // no-op of term 4 at index 2 is durable here
        // Node 2 acknowledges index 1 only.
        leader.step(Message(kind: .appendResponse, from: 2, to: 1, term: 4, index: 1))
        #expect(leader.commitIndex == 0)
        // Node 2 acknowledges the no-op: index 2 (term 4) commits, and index 1 with it.
        leader.step(Message(kind: .appendResponse, from: 2, to: 1, term: 4, index: 2))
        #expect(leader.commitIndex == 2)
    }
}

@Suite("Thesis §9.6: PreVote, and §6.2: CheckQuorum")
struct PreVoteCheckQuorumRules {
    @Test("a partitioned node with PreVote does not raise its term, and rejoins without disrupting the leader")
    func preVoteKeepsTerm() throws {
        var h = try Harness(3)
        h.elect(1)
        let term = h[1].term
        // Node 3 is cut off and times out many times.
        for _ in 0..<5 {
            h.tick(3, times: 2 * h[3].config.electionTicks)
            _ = h.take(where: { $0.from == 3 || $0.to == 3 })
        }
        #expect(h[3].term == term)
        #expect(h[3].role == .preCandidate)
        // It rejoins: the leader's heartbeat brings it back as a follower; nobody's term moved.
        h.tick(1, times: 1)
        h.stabilize()
        #expect(h[1].role == .leader && h[1].term == term)
        #expect(h[3].role == .follower && h[3].leader == 1)
    }

    @Test("granting a PreVote changes neither the voter's term nor its vote")
    func preVoteIsSideEffectFree() throws {
        var h = try Harness(3)
        h[2].step(Message(kind: .preVote, from: 1, to: 2, term: 1))
        let answer = h.take()
        #expect(answer.count == 1 && answer[0].kind == .preVoteResponse && !answer[0].reject)
        #expect(h[2].term == 0 && h[2].vote == .none)
    }

    @Test("without PreVote the same partitioned node does raise its term (the control for the test above)")
    func withoutPreVoteTermGrows() throws {
        var h = try Harness(3) { $0.preVote = false }
        h.elect(1)
        let term = h[1].term
        h.tick(3, times: 2 * h[3].config.electionTicks)
        #expect(h[3].term > term)
    }

    @Test("a leader that has not heard from a quorum within an election timeout steps down")
    func checkQuorumStepsDown() throws {
        var h = try Harness(3)
        h.elect(1)
        for _ in 0..<(2 * h[1].config.electionTicks) {
            h.tick(1, times: 1)
            _ = h.take()  // every message lost
        }
        #expect(h[1].role == .follower)
    }

    @Test("a leader that hears from a quorum stays leader")
    func checkQuorumStays() throws {
        var h = try Harness(3)
        h.elect(1)
        for _ in 0..<(3 * h[1].config.electionTicks) {
            h.tick(1, times: 1)
            h.stabilize(drop: { $0.to == 3 || $0.from == 3 })
        }
        #expect(h[1].role == .leader)
    }

    @Test("a follower within its leader's lease ignores a vote request from a higher term")
    func leaseIgnoresVotes() throws {
        var h = try Harness(3)
        h.elect(1)
        let term = h[2].term
        h[2].step(Message(kind: .vote, from: 3, to: 2, term: term + 5, logTerm: 9, index: 99))
        #expect(h[2].term == term)
        #expect(h.take(where: { $0.from == 2 }).isEmpty)
    }
}

@Suite("Fast failover: a follower that loses its connection to the leader")
struct LostLeaderRules {
    @Test("when every follower loses the leader, the lowest id campaigns within two ticks and wins; no split vote")
    func lostLeaderElectsQuickly() throws {
        var h = try Harness(3)
        h.elect(1)
        let term = h[1].term
        h.tick(2, times: 2)  // well inside the lease
        h.tick(3, times: 2)
        h.nodes[1] = nil  // killed
        h[2].peerUnreachable(1)
        h[3].peerUnreachable(1)
        for _ in 0..<2 {
            h.tick(2, times: 1)
            h.tick(3, times: 1)
            h.stabilize()
        }
        #expect(h[2].role == .leader && h[2].term == term + 1)
        #expect(h[3].role == .follower && h[3].leader == 2)
    }

    @Test("the next voter in order takes its turn two ticks later if the first does not")
    func nextVoterTakesTurn() throws {
        var h = try Harness(5)
        h.elect(1)
        h.nodes[1] = nil
        h.nodes[2] = nil  // the first in order is gone too
        for id: NodeID in [3, 4, 5] { h[id].peerUnreachable(1) }
        var ticks = 0
        while h[3].role != .leader && h[4].role != .leader && h[5].role != .leader && ticks < 10 {
            for id: NodeID in [3, 4, 5] { h.tick(id, times: 1) }
            h.stabilize()
            ticks += 1
        }
        #expect(h[3].role == .leader)
        #expect(ticks <= 4)
        #expect(ticks < h[3].config.electionTicks)
    }

    @Test("one follower losing a live leader's connection does not disrupt it: the other follower refuses the pre-vote")
    func oneLostConnectionIsHarmless() throws {
        var h = try Harness(3)
        h.elect(1)
        let term = h[1].term
        h.tick(2, times: 2)
        h[2].peerUnreachable(1)
        for _ in 0..<4 {
            h.tick(2, times: 1)
            h.stabilize(drop: { $0.from == 1 && $0.to == 2 })  // its link from the leader stays down meanwhile
        }
        #expect(h[2].role == .preCandidate && h[2].term == term)
        #expect(h[1].role == .leader && h[1].term == term)
        // The link comes back: the leader's heartbeat ends the attempt.
        h.tick(1, times: h[1].config.heartbeatTicks)
        h.stabilize()
        #expect(h[2].role == .follower && h[2].leader == 1 && h[2].term == term)
    }

    @Test("it is ignored unless the lost peer is this voter's leader, and by a leader", arguments: [NodeID(1), NodeID(3)])
    func onlyTheLeaderCounts(lost: NodeID) throws {
        var h = try Harness(3)
        h.elect(1)
        let before = h[2].electionElapsed
        h[2].peerUnreachable(lost)
        if lost == 1 {
            #expect(h[2].electionElapsed >= h[2].config.electionTicks)
        } else {
            #expect(h[2].electionElapsed == before)
        }
        let leaderBefore = h[1].electionElapsed
        h[1].peerUnreachable(2)
        #expect(h[1].electionElapsed == leaderBefore && h[1].role == .leader)
    }
}

@Suite("Forwarded proposals (etcd's MsgProp)")
struct ForwardedProposalRules {
    @Test("a follower's proposals go to the leader as one batch; the leader appends them as normal entries and says where; they commit as its own")
    func placed() throws {
        var h = try Harness(3)
        h.elect(1)
        #expect(h.nodes[2]!.forwardProposal(Array("a".utf8), request: 10) == nil)
        #expect(h.nodes[2]!.forwardProposal(Array("b".utf8), request: 11) == nil)
        let asks = h.take(where: { $0.kind == .propose })
        #expect(asks.count == 1 && asks[0].entries.map(\.data) == [Array("a".utf8), Array("b".utf8)], "one batch: \(asks)")
        var forged = asks[0]
        forged.entries[0].kind = .config  // a follower proposes no membership change
        h[1].step(forged)
        let answer = h.take(where: { $0.kind == .proposeResponse })
        #expect(answer.count == 1 && !answer[0].reject && answer[0].logTerm == h[1].term)
        h[2].step(answer[0])
        h.flush()
        h.stabilize()
        let first = answer[0].index
        #expect(h.placed[2] == [
            ForwardedProposal(request: 10, term: h[1].term, index: first),
            ForwardedProposal(request: 11, term: h[1].term, index: first + 1),
        ])
        let applied = h.applied[2, default: []].filter { $0.index >= first }
        #expect(applied.map(\.data) == [Array("a".utf8), Array("b".utf8)] && applied.allSatisfy { $0.kind == .normal })
        #expect(h[1].membership == Membership(voters: [1, 2, 3]))
    }

    @Test("refused at once by a leader, a candidate or a follower without a leader; a batch the leader refuses, or one never sent, is refused; a late answer to a batch given up places nothing")
    func givenUp() throws {
        var h = try Harness(3)
        #expect(h.nodes[2]!.forwardProposal([1], request: 1) == .notLeader(leader: nil))
        h.elect(1)
        #expect(h.nodes[1]!.forwardProposal([1], request: 1) == .notLeader(leader: 1))
        #expect(h.nodes[2]!.forwardProposal(Array(repeating: 0, count: h[2].config.maxEntryBytes + 1), request: 1)
            == .entryTooLarge(size: h[2].config.maxEntryBytes + 1, limit: h[2].config.maxEntryBytes))

        // The leader refuses during a transfer: not appended.
        #expect(h.nodes[1]!.transferLeadership(to: 3) == nil)
        _ = h.take()
        _ = h.nodes[2]!.forwardProposal([2], request: 2)
        h[1].step(h.take(where: { $0.kind == .propose })[0])
        let refusal = h.take(where: { $0.kind == .proposeResponse })
        #expect(refusal.count == 1 && refusal[0].reject)
        h[2].step(refusal[0])
        h.flush()
        #expect(h.refused[2] == [2])

        // Asked, not yet sent, when the follower hears of a new term: refused (never sent).
        h = try Harness(3)
        h.elect(1)
        _ = h.nodes[2]!.forwardProposal([4], request: 4)
        h[2].step(Message(kind: .heartbeat, from: 3, to: 2, term: h[2].term + 1))
        h.flush()
        #expect(h.refused[2] == [4])

        // A late answer to a batch given up places nothing.
        h = try Harness(3)
        h.elect(1)
        _ = h.nodes[2]!.forwardProposal([6], request: 6)
        let lost = h.take(where: { $0.kind == .propose })
        GiveUp.timeout.happen(to: &h, patience: 3 * h[2].config.electionTicks)
        h[2].step(Message(kind: .proposeResponse, from: 1, to: 2, term: h[2].term, logTerm: h[2].term, index: 50, context: lost[0].context))
        h.flush()
        #expect(h.placed[2, default: []].isEmpty)
    }

    @Test("a follower's batch stays within maxBytesPerMessage (one proposal at least): each part is placed on its own")
    func batchesSplit() throws {
        var h = try Harness(3) { $0.maxBytesPerMessage = 10 }
        h.elect(1)
        for (request, size) in [(UInt64(1), 4), (2, 4), (3, 4), (4, 30)] {
            #expect(h.nodes[2]!.forwardProposal(Array(repeating: UInt8(request), count: size), request: request) == nil)
        }
        let asks = h.take(where: { $0.kind == .propose })
        #expect(asks.map { $0.entries.map(\.data.count) } == [[4, 4], [4], [30]])
        for ask in asks { h[1].step(ask) }
        h.stabilize()
        #expect(h.placed[2]?.map(\.request) == [1, 2, 3, 4])
        let indexes = h.placed[2]!.map(\.index)
        #expect(Set(indexes).count == 4, "each at its own index: \(indexes)")
    }

    @Test("a proposal sent and unanswered has an unknown outcome when the follower gives up on its leader", arguments: GiveUp.allCases)
    func unknownWhenGivenUp(_ way: GiveUp) throws {
        var h = try Harness(3)
        h.elect(1)
        _ = h.nodes[2]!.forwardProposal([3], request: 3)
        _ = h.take()
        way.happen(to: &h, patience: 3 * h[2].config.electionTicks)
        #expect(h.unknown[2] == [3])
        #expect(h.placed[2, default: []].isEmpty)
    }
}

@Suite("Thesis §6.4: ReadIndex")
struct ReadIndexRules {
    @Test("a read on a candidate, or on a follower that knows no leader, is refused")
    func noLeaderRefuses() throws {
        var h = try Harness(3)
        #expect(h.nodes[2]!.readIndex(request: 1) == .notLeader(leader: nil))
        h[3].campaign()
        #expect(h.nodes[3]!.readIndex(request: 1) == .notLeader(leader: nil))
    }

    @Test("a follower's reads go to the leader as one batch; with five voters the leader answers once a quorum confirms it, with its commit index, which the follower's read state carries")
    func followerAsksLeader() throws {
        var h = try Harness(5)
        h.elect(1)
        #expect(h.propose(1, "a").isSuccess)
        h.stabilize()
        for r in UInt64(1)...20 { #expect(h.nodes[2]!.readIndex(request: r) == nil) }
        let asks = h.take(where: { $0.kind == .readIndex })
        #expect(asks.count == 1 && asks[0].from == 2 && asks[0].to == 1 && asks[0].term == h[1].term, "one batch: \(asks)")
        h[1].step(asks[0])
        // The leader and the asker are two of five: the leader confirms with a heartbeat round before it answers.
        #expect(h.take(where: { $0.kind == .readIndexResponse }).isEmpty)
        let heartbeats = h.take(where: { $0.kind == .heartbeat })
        #expect(heartbeats.count == 4 && heartbeats.allSatisfy { $0.context != 0 })
        h[3].step(heartbeats.first { $0.to == 3 }!)
        h.flush()
        for m in h.take(where: { $0.kind == .heartbeatResponse }) { h[1].step(m) }
        h.flush()
        #expect(h.take(where: { $0.kind == .readIndexResponse }).isEmpty, "answered with two acknowledgements of five")
        h[4].step(heartbeats.first { $0.to == 4 }!)
        h.stabilize()
        let states = h.readStates[2, default: []]
        #expect(states.count == 1)
        #expect(states.first?.requests == Array(1...20))
        #expect(states.first?.index == h[1].commitIndex)
        #expect(h.readStates[1, default: []].isEmpty, "the leader's own shell serves nothing")
    }

    @Test("with three voters a follower's read request is its own confirmation: the leader answers at once with its commit index, and a read of its own waiting for a round still waits for it")
    func threeVotersAnswerAtOnce() throws {
        var h = try Harness(3)
        h.elect(1)
        #expect(h.propose(1, "a").isSuccess)
        h.stabilize()
        // A read of the leader's own: its round is under way (heartbeats out, not answered).
        #expect(h.nodes[1]!.readIndex(request: 1) == nil)
        h.flush()
        let round = h.take(where: { $0.kind == .heartbeat && $0.context != 0 })
        #expect(round.count == 2)
        for r in UInt64(2)...4 { #expect(h.nodes[2]!.readIndex(request: r) == nil) }
        h.flush()
        let ask = h.take(where: { $0.kind == .readIndex })
        #expect(ask.count == 1)
        h[1].step(ask[0])
        h.flush()
        let answers = h.take(where: { $0.kind == .readIndexResponse })
        #expect(answers.count == 1 && !answers[0].reject && answers[0].index == h[1].commitIndex, "\(answers)")
        #expect(h.take(where: { $0.kind == .heartbeat && $0.context != 0 }).isEmpty, "no round for the follower's read")
        #expect(h.readStates[1, default: []].isEmpty, "the leader's own read, asked after the follower's request may have been sent, waits for its round")
        h[2].step(answers[0])
        h.flush()
        #expect(h.readStates[2]?.first?.requests == [2, 3, 4])
        #expect(h.readStates[2]?.first?.index == h[1].commitIndex)
        // The round's answers then serve the leader's own read.
        for m in round { h[m.to].step(m) }
        h.stabilize()
        #expect(h.readStates[1]?.first?.requests == [1])
    }

    @Test("the leader answers a read request at once only when it and the asker are a quorum: two voters yes; four voters, or a learner asking beside three voters, wait for a round")
    func answeredAtOnceOnlyByAQuorum() throws {
        /// Whether the leader (node 1) answers `asker`'s read at once, without a heartbeat round.
        func atOnce(_ h: inout Harness, asker: NodeID) -> Bool {
            #expect(h.nodes[asker]!.readIndex(request: 7) == nil)
            let ask = h.take(where: { $0.kind == .readIndex })
            guard ask.count == 1 else {
                Issue.record("node \(asker) sent \(ask.count) read requests")
                return false
            }
            h[1].step(ask[0])
            h.flush()
            let answered = !h.take(where: { $0.kind == .readIndexResponse }).isEmpty
            let round = !h.take(where: { $0.kind == .heartbeat && $0.context != 0 }).isEmpty
            #expect(answered != round, "answered at once \(answered), a round \(round)")
            return answered
        }
        var two = try Harness(2)
        two.elect(1)
        #expect(atOnce(&two, asker: 2))
        var four = try Harness(4)
        four.elect(1)
        #expect(!atOnce(&four, asker: 2))
        var learner = try Harness(3)
        learner.elect(1)
        try learner.addFreshNode(4)
        #expect(learner.change(1, .addLearner(4)) == nil)
        #expect(!atOnce(&learner, asker: 4))
        #expect(atOnce(&learner, asker: 2))
    }

    @Test("a leader that steps down holding a follower's reads says so, and the follower drops them; a late answer to reads given up serves nothing")
    func followerReadsDropped() throws {
        // The leader steps down holding them (five voters: a round must confirm them): it says so, and the follower
        // drops them.
        var h = try Harness(5)
        h.elect(1)
        _ = h.nodes[2]!.readIndex(request: 1)
        h[1].step(h.take(where: { $0.kind == .readIndex })[0])
        _ = h.take()
        h[1].step(Message(kind: .appendResponse, from: 3, to: 1, term: h[1].term + 1))
        let refusal = h.take(where: { $0.kind == .readIndexResponse })
        try #require(refusal.count == 1)
        #expect(refusal[0].reject)
        h[2].step(refusal[0])
        h.flush()
        #expect(h.droppedReads[2] == [1])

        // A late answer to a batch given up serves nothing.
        h = try Harness(3)
        h.elect(1)
        _ = h.nodes[2]!.readIndex(request: 4)
        let lost = h.take(where: { $0.kind == .readIndex })
        GiveUp.timeout.happen(to: &h, patience: h[2].config.electionTicks)
        #expect(h.droppedReads[2] == [4])
        h[2].step(Message(kind: .readIndexResponse, from: 1, to: 2, term: h[2].term, index: 99, context: lost[0].context))
        h.flush()
        #expect(h.readStates[2, default: []].isEmpty)
    }

    @Test("a follower's reads sent to its leader are dropped when it gives up on that leader", arguments: GiveUp.allCases)
    func droppedWhenGivenUp(_ way: GiveUp) throws {
        var h = try Harness(3)
        h.elect(1)
        _ = h.nodes[2]!.readIndex(request: 2)
        _ = h.take()
        way.happen(to: &h, patience: h[2].config.electionTicks)
        #expect(h.droppedReads[2] == [2])
        #expect(h.readStates[2, default: []].isEmpty)
    }

    @Test("a new leader answers a follower's read only after it commits an entry of its own term")
    func followerReadWaitsForLeadersTerm() throws {
        var h = try Harness(3)
        h[1].campaign()
        h.stabilize(drop: { $0.kind == .append || $0.kind == .appendResponse })
        #expect(h[1].role == .leader)
        // Node 2 voted, so it knows the term but not yet the leader: it refuses. Once a heartbeat names the leader,
        // its read is forwarded and answered after the no-op commits.
        #expect(h.nodes[2]!.readIndex(request: 5) == .notLeader(leader: nil))
        h.tick(1, times: h[1].config.heartbeatTicks)
        h.stabilize(drop: { $0.kind == .append || $0.kind == .appendResponse })
        #expect(h[2].leader == 1)
        #expect(h.nodes[2]!.readIndex(request: 5) == nil)
        h.stabilize(drop: { $0.kind == .append || $0.kind == .appendResponse })
        #expect(h.readStates[2, default: []].isEmpty, "no answer before the leader's own commit")
        h.tick(1, times: 1)
        h.stabilize()
        #expect(h.readStates[2]?.first?.requests == [5])
        #expect(h.readStates[2]!.first!.index >= 1)
    }

    @Test("reads wait for a quorum's heartbeat answers; concurrent reads share one round")
    func oneRoundForMany() throws {
        var h = try Harness(3)
        h.elect(1)
        for r in UInt64(1)...50 { #expect(h.nodes[1]!.readIndex(request: r) == nil) }
        let heartbeats = h.take(where: { $0.kind == .heartbeat })
        #expect(heartbeats.count == 2, "one round to two followers")
        #expect(h.readStates[1, default: []].isEmpty)
        // One follower answers: with the leader, a quorum.
        h[2].step(heartbeats.first { $0.to == 2 }!)
        h.stabilize()
        let states = h.readStates[1]!
        #expect(states.count == 1)
        #expect(states[0].requests == Array(1...50))
        #expect(states[0].index == h[1].commitIndex)
    }

    @Test("a new leader serves no read before it commits an entry of its own term")
    func waitsForOwnTerm() throws {
        var h = try Harness(3)
        h[1].campaign()
        // Deliver votes only: the leader's no-op is not yet acknowledged.
        h.stabilize(drop: { $0.kind == .append || $0.kind == .appendResponse })
        #expect(h[1].role == .leader)
        #expect(h.nodes[1]!.readIndex(request: 7) == nil)
        h.flush()
        #expect(h.take(where: { $0.kind == .heartbeat && $0.context != 0 }).isEmpty)
        h.tick(1, times: 1)
        h.stabilize()
        #expect(h.readStates[1]?.first?.requests == [7])
        #expect(h.readStates[1]!.first!.index >= 1)
    }

    @Test("a leader that steps down drops the reads it could not confirm")
    func droppedOnStepDown() throws {
        var h = try Harness(3)
        h.elect(1)
        _ = h.nodes[1]!.readIndex(request: 9)
        _ = h.take()
        h[1].step(Message(kind: .append, from: 2, to: 1, term: h[1].term + 1))
        h.flush()
        #expect(h.droppedReads[1] == [9])
        #expect(h.readStates[1, default: []].isEmpty)
    }
}
