import Testing

@testable import CircuitRaft

extension Harness {
    /// Adds a fresh node that knows no membership yet (it joins through the leader).
    mutating func addFreshNode(_ id: NodeID, configure: (inout RaftConfig) -> Void = { _ in }) throws {
        var c = RaftConfig(id: id, voters: [])
        configure(&c)
        nodes[id] = try Raft(config: c)
    }

    /// Proposes a change on `leader` and delivers everything; returns the refusal, if any.
    mutating func change(_ leader: NodeID, _ change: ConfChange) -> RaftRefusal? {
        if case .failure(let refusal) = nodes[leader]!.proposeConfChange(change) { return refusal }
        stabilize()
        return nil
    }
}

@Suite("Thesis §4: membership changes and learners")
struct MembershipRules {
    @Test("the membership codec round-trips and refuses malformed bytes")
    func membershipCodec() throws {
        let m = Membership(voters: [3, 1, 2], learners: [9])
        #expect(try Membership(decoding: m.encoded) == m)
        #expect(m.voters == [1, 2, 3])
        #expect(throws: RaftConfigError.self) { try Membership(decoding: [1, 2, 3]) }
        // Claims five voters but holds one id.
        #expect(throws: RaftConfigError.self) { try Membership(decoding: [0, 0, 0, 0, 0, 0, 0, 5] + [0, 0, 0, 0, 0, 0, 0, 1]) }
    }

    @Test(
        "each change applies only where it makes sense",
        arguments: [
            (ConfChange.addLearner(4), true), (.addLearner(2), false), (.promote(4), false), (.promote(9), true),
            (.remove(2), true), (.remove(7), false),
        ])
    func changeValidity(change: ConfChange, valid: Bool) {
        let m = Membership(voters: [1, 2, 3], learners: [9])
        let result = m.applying(change)
        if case .success = result { #expect(valid) } else { #expect(!valid) }
        #expect(Membership(voters: [1]).applying(.remove(1)) == .failure(.invalidConfChange("cannot remove the last voter 1")))
    }

    @Test("a learner receives the log but neither campaigns nor counts toward a quorum")
    func learnerIsPassive() throws {
        var h = try Harness(3)
        h.elect(1)
        try h.addFreshNode(4)
        #expect(h.change(1, .addLearner(4)) == nil)
        _ = h.propose(1, "to everyone")
        h.stabilize()
        #expect(h[4].lastIndex == h[1].lastIndex)
        #expect(h[4].membership.learners == [4])
        // It never campaigns, however long it waits.
        h.tick(4, times: 10 * h[4].config.electionTicks)
        #expect(h[4].role == .follower)
        #expect(h.take(where: { $0.from == 4 && ($0.kind == .preVote || $0.kind == .vote) }).isEmpty)
        // With voters 2 and 3 cut off, the learner's acknowledgement does not make a quorum.
        guard case .success(let t) = h.propose(1, "needs voters") else { Issue.record("refused"); return }
        h.stabilize(drop: { $0.to == 2 || $0.to == 3 || $0.from == 2 || $0.from == 3 })
        #expect(h[1].commitIndex < t.lastIndex)
        #expect(h[4].lastIndex >= t.lastIndex)
    }

    @Test("a learner is promoted only once it is within the lag bound")
    func promotionNeedsCatchUp() throws {
        var h = try Harness(3) { $0.promotionLag = 3 }
        h.elect(1)
        try h.addFreshNode(4) { $0.promotionLag = 3 }
        // The learner is cut off while the log grows.
        #expect(h.nodes[1]!.proposeConfChange(.addLearner(4)).isSuccess)
        h.stabilize(drop: { $0.to == 4 })
        for i in 0..<10 { _ = h.propose(1, "e\(i)") }
        h.stabilize(drop: { $0.to == 4 })
        guard case .failure(.learnerLagging(id: 4, _, _)) = h.nodes[1]!.proposeConfChange(.promote(4)) else {
            Issue.record("a lagging learner was promoted")
            return
        }
        h.tick(1, times: 1)
        h.stabilize()
        #expect(h.change(1, .promote(4)) == nil)
        #expect(h[1].membership.voters == [1, 2, 3, 4])
        #expect(h[4].membership.voters == [1, 2, 3, 4])
    }

    @Test("a learner the leader has not heard from lately is not promoted, however short the log")
    func silentLearnerNotPromoted() throws {
        var h = try Harness(3)
        h.elect(1)
        try h.addFreshNode(4)
        #expect(h.change(1, .addLearner(4)) == nil)
        // The learner goes silent for a whole election timeout (CheckQuorum's round forgets it).
        h.tick(1, times: h[1].config.electionTicks)
        h.stabilize(drop: { $0.from == 4 })
        guard case .failure(.learnerLagging(id: 4, _, _)) = h.nodes[1]!.proposeConfChange(.promote(4)) else {
            Issue.record("a silent learner was promoted")
            return
        }
        h.tick(1, times: 1)
        h.stabilize()
        #expect(h.change(1, .promote(4)) == nil)
    }

    @Test("a learner that answered a tick ago is promotable at every tick, CheckQuorum's round boundaries included")
    func answeringLearnerAlwaysPromotable() throws {
        var h = try Harness(3)
        h.elect(1)
        try h.addFreshNode(4)
        #expect(h.change(1, .addLearner(4)) == nil)
        for step in 0..<(3 * h[1].config.electionTicks) {
            h.tick(1, times: 1)
            var trial = h.nodes[1]!  // a copy: the trial proposal changes nothing here
            if case .failure(let refusal) = trial.proposeConfChange(.promote(4)) {
                Issue.record("refused at tick \(step): \(refusal)")
            }
            #expect(h[1].role == .leader)
            h.stabilize()
        }
    }

    @Test("with a voter down, a learner promoted in its place commits and the leader keeps leading through CheckQuorum")
    func promoteWithVoterDown() throws {
        var h = try Harness(3)
        h.elect(1)
        try h.addFreshNode(4)
        #expect(h.change(1, .addLearner(4)) == nil)
        let down: (Message) -> Bool = { $0.to == 2 || $0.from == 2 }
        // Voter 2 is gone; time passes (CheckQuorum rounds) with 1, 3 and the learner talking.
        for _ in 0..<3 {
            h.tick(1, times: h[1].config.electionTicks)
            h.stabilize(drop: down)
        }
        #expect(h[1].role == .leader)
        guard case .success(let t) = h.nodes[1]!.proposeConfChange(.promote(4)) else { Issue.record("refused"); return }
        h.stabilize(drop: down)
        #expect(h[1].commitIndex >= t.lastIndex)
        #expect(h[4].membership.voters == [1, 2, 3, 4])
        for _ in 0..<3 {
            for id: NodeID in [1, 3, 4] { h.tick(id, times: h[1].config.electionTicks / 2) }
            h.stabilize(drop: down)
            for id: NodeID in [1, 3, 4] { h.tick(id, times: h[1].config.electionTicks / 2) }
            h.stabilize(drop: down)
            #expect(h[1].role == .leader)
        }
        #expect(h.change(1, .remove(2)) == nil)
        #expect(h[3].membership.voters == [1, 3, 4])
    }

    @Test("one change at a time: a second change waits until the first commits")
    func oneChangeInFlight() throws {
        var h = try Harness(3)
        h.elect(1)
        guard case .success(let t) = h.nodes[1]!.proposeConfChange(.addLearner(4)) else { Issue.record("refused"); return }
        #expect(h.nodes[1]!.proposeConfChange(.addLearner(5)) == .failure(.configChangeInProgress(index: t.firstIndex)))
        try h.addFreshNode(4)
        h.stabilize()
        #expect(h.change(1, .addLearner(5)) == nil)
    }

    @Test("a new leader changes nothing before it commits an entry of its own term")
    func newLeaderMustCommitFirst() throws {
        var h = try Harness(3)
        h[1].campaign()
        h.stabilize(drop: { $0.kind == .append || $0.kind == .appendResponse })
        #expect(h[1].role == .leader)
        #expect(h.nodes[1]!.proposeConfChange(.remove(3)) == .failure(.leaderNotReady))
    }

    @Test("a membership takes effect when appended, and reverts if the entry is replaced")
    func effectOnAppendRevertOnTruncate() throws {
        var h = try Harness(3) { $0.checkQuorum = false }
        h.elect(1)
        // Leader 1 appends a removal that stays in its own log.
        #expect(h.nodes[1]!.proposeConfChange(.remove(3)).isSuccess)
        #expect(h[1].membership.voters == [1, 2])
        h.flush()
        h.mailbox.removeAll()
        // Node 2 takes over with 3 (its log lacks the change) and overwrites 1's uncommitted entry.
        h[2].campaign()
        h.stabilize(drop: { $0.to == 1 || $0.from == 1 })
        #expect(h[2].role == .leader)
        _ = h.propose(2, "x")
        // Node 1 is reachable again; the next heartbeat resumes the probe that was lost.
        h.tick(2, times: 1)
        h.stabilize()
        #expect(h[1].log.entries == h[2].log.entries)
        #expect(h[1].membership.voters == [1, 2, 3], "the replaced config entry no longer counts")
    }

    @Test("a leader removed from the configuration steps down once the change commits, and hands over")
    func removedLeaderStepsDown() throws {
        var h = try Harness(3)
        h.elect(1)
        #expect(h.change(1, .remove(1)) == nil)
        #expect(h[1].role == .follower)
        #expect(!h[1].membership.contains(1))
        // The most up-to-date voter was told to campaign at once.
        h.stabilize()
        #expect(h.nodes.values.filter { $0.role == .leader }.map(\.config.id).allSatisfy { $0 != 1 })
        #expect(h[2].role == .leader || h[3].role == .leader)
        // The removed node never campaigns again.
        h.tick(1, times: 10 * h[1].config.electionTicks)
        #expect(h[1].role == .follower)
    }

    @Test("a removed node that never learned of its removal cannot disrupt the cluster")
    func removedNodeCannotDisrupt() throws {
        var h = try Harness(3)
        h.elect(1)
        // Node 3 is cut off before its removal reaches it.
        #expect(h.nodes[1]!.proposeConfChange(.remove(3)).isSuccess)
        h.stabilize(drop: { $0.to == 3 || $0.from == 3 })
        let term = h[1].term
        for _ in 0..<5 {
            h.tick(3, times: 2 * h[3].config.electionTicks)
            h.tick(1, times: 1)
            h.stabilize()
        }
        #expect(h[1].role == .leader && h[1].term == term)
        #expect(h[2].term == term)
    }
}

@Suite("Thesis §3.10: leader transfer")
struct TransferRules {
    @Test("an up-to-date target is told to campaign at once and wins past the lease; proposals wait meanwhile")
    func transferToUpToDate() throws {
        var h = try Harness(3)
        h.elect(1)
        let term = h[1].term
        #expect(h.nodes[1]!.transferLeadership(to: 2) == nil)
        #expect(h.propose(1, "wait") == .failure(.transferInProgress(to: 2)))
        let timeoutNow = h.take(where: { $0.kind == .timeoutNow })
        #expect(timeoutNow.map(\.to) == [2])
        h[2].step(timeoutNow[0])
        h.stabilize()
        #expect(h[2].role == .leader)
        #expect(h[2].term == term + 1)
        #expect(h[1].role == .follower)
    }

    @Test("a lagging target is brought up to date first")
    func transferToLagging() throws {
        var h = try Harness(3)
        h.elect(1)
        for i in 0..<5 { _ = h.propose(1, "e\(i)") }
        h.stabilize(drop: { $0.to == 3 })
        #expect(h.nodes[1]!.transferLeadership(to: 3) == nil)
        h.tick(1, times: 1)
        h.stabilize()
        h.tick(1, times: 1)
        h.stabilize()
        #expect(h[3].role == .leader)
        #expect(h[3].lastIndex >= 6)
    }

    @Test("a transfer that cannot finish is abandoned after an election timeout")
    func transferTimesOut() throws {
        var h = try Harness(3)
        h.elect(1)
        #expect(h.nodes[1]!.transferLeadership(to: 3) == nil)
        for _ in 0..<h[1].config.electionTicks {
            h.tick(1, times: 1)
            h.stabilize(drop: { $0.to == 3 || $0.from == 3 })
        }
        #expect(h[1].role == .leader)
        #expect(h.propose(1, "again").isSuccess)
    }

    @Test("transfer targets must be other voters")
    func transferTargets() throws {
        var h = try Harness(3)
        h.elect(1)
        #expect(h.nodes[1]!.transferLeadership(to: 1) == .invalidTransfer("1 already leads"))
        #expect(h.nodes[1]!.transferLeadership(to: 8) == .invalidTransfer("8 is not a voter"))
        #expect(h.nodes[2]!.transferLeadership(to: 3) == .notLeader(leader: 1))
    }
}

@Suite("Raft §7: snapshots and compaction")
struct SnapshotRules {
    @Test("compaction drops the applied prefix and records the membership as of its index")
    func compaction() throws {
        var h = try Harness(3)
        h.elect(1)
        for i in 0..<10 { _ = h.propose(1, "e\(i)") }
        h.stabilize()
        let applied = h[1].appliedIndex
        #expect(h.nodes[1]!.compact(through: applied + 1) == nil, "cannot compact beyond what is applied")
        let compacted = h.nodes[1]!.compact(through: applied)
        let meta = try #require(compacted)
        #expect(meta.index == applied && meta.term == h[1].term)
        #expect(meta.membership == Membership(voters: [1, 2, 3]))
        #expect(h[1].log.offset == applied && h[1].log.entries.isEmpty)
        #expect(h.nodes[1]!.compact(through: applied) == nil, "nothing left to compact")
    }

    @Test("a follower behind the leader's compacted log receives InstallSnapshot and nothing else until it answers")
    func lateFollowerGetsSnapshot() throws {
        var h = try Harness(3)
        h.elect(1)
        for i in 0..<10 { _ = h.propose(1, "e\(i)") }
        h.stabilize(drop: { $0.to == 3 })
        let compacted = h.nodes[1]!.compact(through: h[1].appliedIndex)
        let meta = try #require(compacted)
        // Heartbeats reveal that node 3 is stuck; it is sent the snapshot and nothing else.
        var toThree: [Message] = []
        for _ in 0..<(Raft.stalledRoundsBeforeProbe + 2) {
            h.tick(1, times: 1)
            h.stabilize(drop: { m in
                guard m.to == 3 && m.kind != .heartbeat else { return false }
                toThree.append(m)
                return true
            })
        }
        let snapshots = toThree.filter { $0.kind == .snapshot }
        #expect(snapshots.count == 1)
        #expect(snapshots.first?.snapshot == meta)
        #expect(!toThree.contains { $0.kind == .append && !$0.entries.isEmpty })
        guard !snapshots.isEmpty else { return }
        // The follower installs it: the Ready names it, the log is replaced, the membership comes with it.
        h[3].step(snapshots[0])
        let rd = h.nodes[3]!.ready()
        #expect(rd.snapshot == meta)
        #expect(rd.mustSync)
        #expect(rd.committedEntries.isEmpty)
        #expect(rd.messages.contains { $0.kind == .appendResponse && $0.index == meta.index })
        h.nodes[3]!.advance(rd)
        #expect(h[3].log.offset == meta.index)
        #expect(h[3].commitIndex == meta.index && h[3].appliedIndex == meta.index)
        h.mailbox.append(contentsOf: rd.messages)
        h.stabilize()
        _ = h.propose(1, "after")
        h.stabilize()
        #expect(h[3].lastIndex == h[1].lastIndex)
    }

    @Test("a snapshot no newer than the follower's commit index is answered, not installed")
    func staleSnapshotIgnored() throws {
        var h = try Harness(3)
        h.elect(1)
        _ = h.propose(1, "a")
        h.stabilize()
        let old = SnapshotMetadata(index: 1, term: h[1].term, membership: Membership(voters: [1, 2, 3]))
        h[2].step(Message(kind: .snapshot, from: 1, to: 2, term: h[1].term, snapshot: old))
        let rd = h.nodes[2]!.ready()
        #expect(rd.snapshot == nil)
        #expect(rd.messages.first?.index == h[2].commitIndex)
        h.nodes[2]!.advance(rd)
    }

    @Test("a failed snapshot stream sends the leader back to probing, which sends it again")
    func failedSnapshotRetries() throws {
        var h = try Harness(3)
        h.elect(1)
        for i in 0..<5 { _ = h.propose(1, "e\(i)") }
        h.stabilize(drop: { $0.to == 3 })
        _ = h.nodes[1]!.compact(through: h[1].appliedIndex)
        var lost = 0
        for _ in 0..<(Raft.stalledRoundsBeforeProbe + 2) {
            h.tick(1, times: 1)
            h.stabilize(drop: { m in
                guard m.to == 3 && m.kind == .snapshot else { return false }
                lost += 1
                return true
            })
        }
        #expect(lost == 1, "one snapshot sent, then the leader waits for its outcome")
        h.nodes[1]!.reportSnapshot(to: 3, succeeded: false)
        h.tick(1, times: 1)
        h.stabilize()
        #expect(h[3].log.offset == h[1].log.offset, "the second attempt was installed")
    }

    @Test("a node restarts from a snapshot plus the entries after it")
    func restartFromSnapshot() throws {
        let meta = SnapshotMetadata(index: 10, term: 2, membership: Membership(voters: [1, 2], learners: [3]))
        let r = try Raft(
            config: RaftConfig(id: 3, voters: []), hardState: HardState(term: 3, vote: 0, commit: 11),
            entries: [Entry(term: 3, index: 11)], snapshot: meta)
        #expect(r.membership == meta.membership)
        #expect(r.commitIndex == 11 && r.appliedIndex == 10 && r.lastIndex == 11)
        #expect(throws: RaftConfigError.self) {
            try Raft(config: RaftConfig(id: 3, voters: []), entries: [Entry(term: 3, index: 13)], snapshot: meta)
        }
    }
}

extension Result {
    var isSuccess: Bool {
        if case .success = self { return true }
        return false
    }
}
