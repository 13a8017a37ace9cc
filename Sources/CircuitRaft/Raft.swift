/// The Raft protocol as a pure value type: no clocks, sockets, threads or disk.
///
/// The shell feeds it events (`tick`, `step`, `propose`, `readIndex`, `campaign`) and then takes one `Ready` batch,
/// which it carries out in this order before calling `advance`:
///
/// 1. send `messagesBeforePersist`, then persist `entries` (replacing any suffix from the first one's index) and
///    `hardState`, with fsync;
/// 2. send `messages` (they may depend on what step 1 made durable: votes, acknowledgements);
/// 3. apply `committedEntries` in order, and serve `readStates` once their index is applied;
/// 4. call `advance(ready)`.
///
/// A leader counts its own log towards a quorum only once `advance` reports it durable (etcd #14370).
public struct Raft: Sendable {
    public let config: RaftConfig
    public private(set) var term: UInt64 = 0
    public private(set) var vote: NodeID = .none
    public private(set) var leader: NodeID = .none
    public private(set) var role: Role = .follower

    private(set) var log: RaftLog
    /// The membership in effect: the latest in the log, or the snapshot's, or the bootstrap voters.
    public private(set) var membership: Membership
    /// Index of the config entry in effect (the snapshot's index if it came from there, 0 for bootstrap).
    private var membershipIndex: UInt64 = 0
    /// The snapshot the log starts after, if any.
    public private(set) var snapshot: SnapshotMetadata?
    /// A snapshot received from the leader, to be installed by the shell.
    private var snapshotToInstall: SnapshotMetadata?
    private var leadTransferee: NodeID = .none
    private var transferElapsed = 0
    private var rng: SplitMix64
    private(set) var electionElapsed = 0
    private var heartbeatElapsed = 0
    private var randomizedElectionTimeout = 0
    private var progress: [NodeID: Progress] = [:]
    private var votes: [NodeID: Bool] = [:]
    private var outbox: [Message] = []
    private var readyReads: [ReadState] = []
    private var droppedReads: [UInt64] = []
    /// Read requests that wait for this leader's first commit in its term.
    private var readsAwaitingCommit: [ReadRequest] = []
    /// Read requests that wait for the next confirmation round to start (one round serves them all).
    private var readsQueued: [ReadRequest] = []
    private var readRounds: [ReadRound] = []
    private var nextReadContext: UInt64 = 1
    /// A follower's reads not yet sent to the leader: the next `ready()` sends them as one `readIndex` message.
    private var readsToForward: [UInt64] = []
    /// A follower's reads sent to the leader, by the context of the message that carried them.
    private var forwardedReads: [UInt64: ForwardedReads] = [:]
    private var nextForwardContext: UInt64 = 1
    /// Ticks since this node started: when a forwarded batch was sent.
    private var ticks = 0
    /// A follower's proposals not yet sent to the leader (the next `ready()` sends them as one batch), and those
    /// sent and not yet answered, by the batch's context.
    private var proposalsToForward: [(request: UInt64, data: [UInt8])] = []
    private var forwardedProposals: [UInt64: ForwardedReads] = [:]
    private var proposalsPlaced: [ForwardedProposal] = []
    private var proposalsRefused: [UInt64] = []
    private var proposalsUnknown: [UInt64] = []
    private var persistedHardState: HardState
    private var awaitingAdvance = false

    /// Heartbeat rounds without progress before a follower in replicate state is probed again.
    static let stalledRoundsBeforeProbe = 3

    private struct ReadRound: Sendable {
        var context: UInt64
        var index: UInt64
        var requests: [ReadRequest]
        var acks: Set<NodeID>
    }

    /// A read the leader confirms: its own shell's, or a follower's batch (answered with a `readIndexResponse`).
    private enum ReadRequest: Sendable {
        case local(UInt64)
        case remote(from: NodeID, context: UInt64)
    }

    private struct ForwardedReads: Sendable {
        var requests: [UInt64]
        var sentAt: Int
    }

    /// A node starting from what its store recovered (empty for a new node).
    public init(
        config: RaftConfig, hardState: HardState = HardState(), entries: [Entry] = [], snapshot: SnapshotMetadata? = nil
    ) throws(RaftConfigError) {
        try config.validate()
        if let first = entries.first, first.index != (snapshot?.index ?? first.index - 1) + 1 {
            throw .invalid("the log starts at \(first.index) but the snapshot ends at \(snapshot?.index ?? 0)")
        }
        self.config = config
        self.rng = SplitMix64(seed: config.randomSeed != 0 ? config.randomSeed : config.id &* 0x2545_F491_4F6C_DD1D)
        // Forwarded reads are matched to their answers by context: a context drawn at random for each start keeps
        // an answer meant for a previous incarnation (still in flight) from matching a read asked now.
        self.nextForwardContext = rng.next() | 1
        self.log = RaftLog(recovered: entries, commit: hardState.commit, snapshot: snapshot)
        self.snapshot = snapshot
        self.membership = Membership(voters: config.voters)
        self.term = hardState.term
        self.vote = hardState.vote
        self.persistedHardState = hardState
        if hardState.commit > log.lastIndex {
            throw .invalid("hard state commit \(hardState.commit) is beyond the last log index \(log.lastIndex)")
        }
        recomputeMembership()
        becomeFollower(term: hardState.term, leader: .none)
    }

    // MARK: - Observers

    public var commitIndex: UInt64 { log.committed }
    public var lastIndex: UInt64 { log.lastIndex }
    public var lastTerm: UInt64 { log.lastTerm }
    public var appliedIndex: UInt64 { log.applied }
    public var stableIndex: UInt64 { log.stable }
    public var hardState: HardState { HardState(term: term, vote: vote, commit: log.committed) }
    private var quorum: Int { membership.quorum }
    /// Everyone this node replicates to when it leads: voters and learners but itself.
    private var peers: [NodeID] { membership.members.filter { $0 != config.id } }
    private var isVoter: Bool { membership.isVoter(config.id) }
    /// This leader has committed an entry of its own term: its commit index covers everything committed before it
    /// (thesis §6.4), which reads and membership changes wait for.
    private var committedInOwnTerm: Bool { log.term(at: log.committed) == term }

    /// The leader's view of each follower, for diagnostics.
    public var debugProgress: String {
        progress.keys.sorted().map { id in
            let p = progress[id]!
            return "\(id):\(p.state) m\(p.match) n\(p.next) inflight \(p.inflight.count) probeSent \(p.probeSent)"
        }.joined(separator: ", ")
    }

    /// Term and vote must be durable before anything that depends on them is sent. The commit index need not be
    /// (it is learned again from the leader after a restart), so a change of it alone costs no fsync: it is written
    /// along with the next entries.
    private var hardStateMustPersist: Bool {
        term != persistedHardState.term || vote != persistedHardState.vote
    }

    /// How far committed entries may be applied: with asynchronous storage writes, only as far as they are durable
    /// here (as etcd does), so that a snapshot never covers entries this node's log could still lose.
    private var applyLimit: UInt64 {
        config.asyncStorageWrites ? min(log.committed, log.stable) : log.committed
    }

    /// Whether `ready()` has anything to hand out.
    public var hasReady: Bool {
        hardStateMustPersist || !log.toPersist.isEmpty || !outbox.isEmpty || !readyReads.isEmpty
            || !droppedReads.isEmpty || !readsQueued.isEmpty || !readsToForward.isEmpty || log.applied < applyLimit
            || snapshotToInstall != nil || !proposalsToForward.isEmpty || !proposalsPlaced.isEmpty
            || !proposalsRefused.isEmpty || !proposalsUnknown.isEmpty
    }

    // MARK: - Events

    /// One unit of logical time.
    public mutating func tick() {
        ticks += 1
        expireForwardedReads()
        switch role {
        case .leader:
            heartbeatElapsed += 1
            electionElapsed += 1
            for id in peers where progress[id]!.silentTicks < Int.max { progress[id]!.silentTicks += 1 }
            if leadTransferee != .none {
                transferElapsed += 1
                if transferElapsed >= config.electionTicks { leadTransferee = .none }  // gave up: keep leading
            }
            if electionElapsed >= config.electionTicks {
                electionElapsed = 0
                if config.checkQuorum {
                    // Heard since the previous round: within this round's ticks, or in answer to the round's last tick.
                    let active = membership.voters.filter {
                        $0 == config.id || progress[$0]?.heard(within: config.electionTicks + 1) == true
                    }.count
                    if active < quorum {
                        becomeFollower(term: term, leader: .none)
                        return
                    }
                }
            }
            if heartbeatElapsed >= config.heartbeatTicks {
                heartbeatElapsed = 0
                broadcastHeartbeat(context: 0)
            }
        case .follower, .preCandidate, .candidate:
            electionElapsed += 1
            // Learners, removed nodes and nodes that have not joined yet never campaign.
            if isVoter && electionElapsed >= randomizedElectionTimeout {
                campaign()
            }
        }
    }

    /// The shell saw its connection to `peer` close. When `peer` is this follower's leader it has probably died (a
    /// killed process closes its sockets at once), so the follower stops honouring the leader's lease and campaigns
    /// within a few ticks instead of a whole election timeout: the voters in order of id take turns two ticks apart,
    /// so they do not split the vote. PreVote keeps this harmless when the leader is alive after all: a follower
    /// that still hears it refuses the pre-vote, and the leader's next heartbeat ends the attempt.
    public mutating func peerUnreachable(_ peer: NodeID) {
        guard role == .follower, peer != .none, peer == leader else { return }
        // What was asked of the leader will not be answered.
        dropForwardedReads()
        guard isVoter else { return }
        let others = membership.voters.filter { $0 != peer }.sorted()
        let rank = others.firstIndex(of: config.id) ?? 0
        electionElapsed = max(electionElapsed, config.electionTicks)
        randomizedElectionTimeout = electionElapsed + 1 + 2 * rank
    }

    /// Starts an election now (with a PreVote round first if configured). A leader ignores it.
    public mutating func campaign() {
        guard role != .leader, isVoter else { return }
        if config.preVote {
            becomePreCandidate()
        } else {
            becomeCandidate()
        }
    }

    /// Proposes entries, one per element of `data`. On the leader they are appended and the assigned indexes returned;
    /// each is committed once an applied entry at that index has the returned term.
    public mutating func propose(_ data: [[UInt8]]) -> Result<ProposalTicket, RaftRefusal> {
        guard role == .leader else { return .failure(.notLeader(leader: knownLeader)) }
        if leadTransferee != .none { return .failure(.transferInProgress(to: leadTransferee)) }
        for d in data where d.count > config.maxEntryBytes {
            return .failure(.entryTooLarge(size: d.count, limit: config.maxEntryBytes))
        }
        let first = log.lastIndex + 1
        var index = first
        var new: [Entry] = []
        new.reserveCapacity(data.count)
        for d in data {
            new.append(Entry(term: term, index: index, kind: .normal, data: d))
            index += 1
        }
        log.append(new)
        broadcastAppend(sendIfEmpty: false)
        return .success(ProposalTicket(term: term, firstIndex: first, lastIndex: index - 1))
    }

    /// Asks for a linearizable read (ReadIndex, thesis §6.4). `request` is the caller's identifier; a `ReadState`
    /// naming it comes out of a later `Ready` once leadership is confirmed by a quorum, or it is listed in
    /// `Ready.droppedReads` if this node loses leadership first. Concurrent requests share one confirmation round.
    ///
    /// A follower that knows its leader asks it (`readIndex` message, one per `Ready` for all the reads asked
    /// since): the `ReadState` carries the leader's index, which the shell serves once it has applied that far.
    /// With two or three voters the leader answers a voter's request at once, without a heartbeat round: the
    /// request itself is the confirmation a round would get (see `confirmedByRequest`). The
    /// reads are dropped if the leader or term changes, the leader's connection closes, or no answer comes within
    /// an election timeout. Candidates, and followers that know no leader, refuse.
    public mutating func readIndex(request: UInt64) -> RaftRefusal? {
        guard role == .leader else {
            guard role == .follower, leader != .none else { return .notLeader(leader: knownLeader) }
            readsToForward.append(request)
            return nil
        }
        queueRead(.local(request))
        return nil
    }

    private mutating func queueRead(_ request: ReadRequest) {
        if !committedInOwnTerm {
            readsAwaitingCommit.append(request)
        } else {
            readsQueued.append(request)
        }
    }

    /// A follower hands a client's proposal to its leader (etcd's MsgProp): the proposals asked since the last
    /// `Ready` go as one `propose` message. `Ready.proposalsPlaced` then says where the leader appended it (answer
    /// it when that entry is applied), or `proposalsRefused` that it was not appended, or `proposalsUnknown` that no
    /// answer came (the leader or term changed, the leader's connection closed, an election timeout passed).
    /// Refused at once by a leader (use `propose`), a candidate, and a follower that knows no leader.
    public mutating func forwardProposal(_ data: [UInt8], request: UInt64) -> RaftRefusal? {
        guard role == .follower, leader != .none else { return .notLeader(leader: knownLeader) }
        guard data.count <= config.maxEntryBytes else { return .entryTooLarge(size: data.count, limit: config.maxEntryBytes) }
        proposalsToForward.append((request, data))
        return nil
    }

    /// Proposes one membership change (single-server changes, thesis §4.1). It takes effect on this leader at once
    /// and on each member when the entry reaches its log. Refused while another change is uncommitted, before this
    /// leader has committed an entry of its own term (the fix for single-server changes, thesis §4.1 erratum), and,
    /// for a promotion, while the learner is more than `promotionLag` entries behind.
    public mutating func proposeConfChange(_ change: ConfChange) -> Result<ProposalTicket, RaftRefusal> {
        guard role == .leader else { return .failure(.notLeader(leader: knownLeader)) }
        if leadTransferee != .none { return .failure(.transferInProgress(to: leadTransferee)) }
        guard committedInOwnTerm else { return .failure(.leaderNotReady) }
        guard membershipIndex <= log.committed else { return .failure(.configChangeInProgress(index: membershipIndex)) }
        if case .promote(let id) = change, let pr = progress[id] {
            // Caught up, and heard from within the current election timeout: a learner this leader cannot reach
            // would stall every commit once it counts toward the quorum.
            guard pr.heard(within: config.electionTicks) else { return .failure(.learnerLagging(id: id, match: pr.match, last: log.lastIndex)) }
            if pr.match + config.promotionLag < log.lastIndex {
                return .failure(.learnerLagging(id: id, match: pr.match, last: log.lastIndex))
            }
        }
        let next: Membership
        switch membership.applying(change) {
        case .success(let m): next = m
        case .failure(let refusal): return .failure(refusal)
        }
        let index = log.lastIndex + 1
        log.append([Entry(term: term, index: index, kind: .config, data: next.encoded)])
        setMembership(next, at: index)
        broadcastAppend(sendIfEmpty: false)
        return .success(ProposalTicket(term: term, firstIndex: index, lastIndex: index))
    }

    /// Hands leadership to `target` (thesis §3.10): proposals stop, the target is brought up to date, then told to
    /// campaign at once (TimeoutNow). Abandoned after an election timeout.
    public mutating func transferLeadership(to target: NodeID) -> RaftRefusal? {
        guard role == .leader else { return .notLeader(leader: knownLeader) }
        guard target != config.id else { return .invalidTransfer("\(target) already leads") }
        guard membership.isVoter(target), progress[target] != nil else {
            return .invalidTransfer("\(target) is not a voter")
        }
        leadTransferee = target
        transferElapsed = 0
        if progress[target]!.match == log.lastIndex {
            send(Message(kind: .timeoutNow, from: config.id, to: target, term: term))
        } else {
            sendAppend(to: target, sendIfEmpty: true)
        }
        return nil
    }

    /// The voter most up to date with this leader's log, other than itself: the natural target of a transfer.
    public var bestTransferTarget: NodeID? {
        membership.voters.filter { $0 != config.id && progress[$0] != nil }.max { progress[$0]!.match < progress[$1]!.match }
    }

    /// The metadata a snapshot of the state machine at `index` (applied, still in the log) will carry.
    public func snapshotMetadata(at index: UInt64) -> SnapshotMetadata? {
        guard index > log.offset, index <= log.applied, let term = log.term(at: index) else { return nil }
        return SnapshotMetadata(index: index, term: term, membership: membershipAt(index))
    }

    /// The shell has made a snapshot of the state machine durable, covering entries up to `index` (which must be
    /// applied): the log before it is dropped. Returns the snapshot's metadata, for the store; nil if nothing to do.
    public mutating func compact(through index: UInt64) -> SnapshotMetadata? {
        guard index > log.offset, index <= log.applied, index <= log.stable, let term = log.term(at: index) else {
            return nil
        }
        let meta = SnapshotMetadata(index: index, term: term, membership: membershipAt(index))
        log.compact(through: index)
        snapshot = meta
        return meta
    }

    /// The shell's word on a snapshot it was streaming to `id`. Either way the leader goes back to probing: after a
    /// success it waits for the follower's next answer (whose acknowledgement may itself be lost), after a failure
    /// it probes at once, which sends the snapshot again if still needed.
    public mutating func reportSnapshot(to id: NodeID, succeeded: Bool) {
        guard role == .leader, let pr = progress[id], case .snapshot(let pending) = pr.state else { return }
        progress[id]!.becomeProbe()
        if succeeded {
            // The follower now holds the snapshot: probe from after it, not from where it was before.
            progress[id]!.next = max(pr.match, pending) + 1
            progress[id]!.probeSent = true
        }
    }

    /// A message from a peer.
    public mutating func step(_ m: Message) {
        guard m.to == config.id, m.from != config.id, m.from != .none else { return }
        if m.term > term {
            if m.kind == .vote || m.kind == .preVote {
                // CheckQuorum's lease: a follower that heard from a live leader within the election timeout
                // ignores candidates, so a node cut off for a while cannot depose a healthy leader.
                let inLease = config.checkQuorum && leader != .none && electionElapsed < config.electionTicks
                if inLease && m.context != Message.transferContext { return }
            }
            switch m.kind {
            case .preVote:
                break  // A PreVote carries a future term; granting it changes nothing here.
            case .preVoteResponse where !m.reject:
                break  // The future term we asked for; counted below.
            case .append, .heartbeat, .snapshot:
                becomeFollower(term: m.term, leader: m.from)
            default:
                becomeFollower(term: m.term, leader: .none)
            }
        } else if m.term < term {
            if (config.checkQuorum || config.preVote) && (m.kind == .append || m.kind == .heartbeat || m.kind == .snapshot) {
                // A stale leader: tell it our term so it steps down (it may have been partitioned away).
                send(Message(kind: .appendResponse, from: config.id, to: m.from, term: term))
            } else if m.kind == .preVote {
                send(Message(kind: .preVoteResponse, from: config.id, to: m.from, term: term, reject: true))
            }
            return
        }

        switch m.kind {
        case .preVote, .vote:
            handleVoteRequest(m)
            return
        default:
            break
        }

        switch role {
        case .follower:
            switch m.kind {
            case .append:
                electionElapsed = 0
                leader = m.from
                handleAppend(m)
            case .heartbeat:
                electionElapsed = 0
                leader = m.from
                handleHeartbeat(m)
            case .snapshot:
                electionElapsed = 0
                leader = m.from
                handleSnapshot(m)
            case .timeoutNow:
                // The leader asks this node to take over: campaign at once, past PreVote and the lease.
                if isVoter { becomeCandidate(transfer: true) }
            case .proposeResponse:
                guard m.from == leader, let batch = forwardedProposals.removeValue(forKey: m.context) else { break }
                if m.reject {
                    proposalsRefused.append(contentsOf: batch.requests)
                } else {
                    for (k, request) in batch.requests.enumerated() {
                        proposalsPlaced.append(ForwardedProposal(request: request, term: m.logTerm, index: m.index + UInt64(k)))
                    }
                }
            case .readIndexResponse:
                guard m.from == leader, let batch = forwardedReads.removeValue(forKey: m.context) else { break }
                if m.reject {
                    droppedReads.append(contentsOf: batch.requests)
                } else {
                    readyReads.append(ReadState(index: m.index, requests: batch.requests))
                }
            default:
                break
            }
        case .preCandidate, .candidate:
            switch m.kind {
            case .append:
                becomeFollower(term: m.term, leader: m.from)
                handleAppend(m)
            case .heartbeat:
                becomeFollower(term: m.term, leader: m.from)
                handleHeartbeat(m)
            case .snapshot:
                becomeFollower(term: m.term, leader: m.from)
                handleSnapshot(m)
            case .preVoteResponse where role == .preCandidate:
                tally(from: m.from, granted: !m.reject)
            case .voteResponse where role == .candidate:
                tally(from: m.from, granted: !m.reject)
            default:
                break
            }
        case .leader:
            switch m.kind {
            case .appendResponse:
                handleAppendResponse(m)
            case .heartbeatResponse:
                handleHeartbeatResponse(m)
            case .readIndex:
                guard membership.contains(m.from) else { break }
                if confirmedByRequest(from: m.from) {
                    send(Message(kind: .readIndexResponse, from: config.id, to: m.from, term: term, index: log.committed, context: m.context))
                } else {
                    queueRead(.remote(from: m.from, context: m.context))
                }
            case .propose:
                guard membership.contains(m.from) else { break }
                handleForwardedProposals(m)
            default:
                break
            }
        }
    }

    // MARK: - Ready and advance

    /// Takes everything the shell must do now. Call `advance` with it before the next `ready()`.
    public mutating func ready() -> Ready {
        precondition(!awaitingAdvance, "ready() called twice without advance()")
        startReadRound()
        forwardReads()
        forwardProposals()
        var rd = Ready()
        rd.snapshot = snapshotToInstall
        rd.entries = Array(log.toPersist)
        rd.persistInline = !config.asyncStorageWrites || hardStateMustPersist || snapshotToInstall != nil
        rd.epoch = log.epoch
        if hardStateMustPersist || (!rd.entries.isEmpty && hardState != persistedHardState) {
            rd.hardState = hardState
        }
        for m in outbox {
            if mayGoBeforePersist(m, inline: rd.persistInline) {
                rd.messagesBeforePersist.append(m)
            } else {
                rd.messages.append(m)
            }
        }
        outbox.removeAll(keepingCapacity: true)
        rd.committedEntries = log.nextToApply(maxBytes: config.maxCommittedBytesPerReady, upTo: applyLimit)
        rd.readStates = readyReads
        readyReads.removeAll()
        rd.droppedReads = droppedReads
        droppedReads.removeAll()
        rd.proposalsPlaced = proposalsPlaced
        rd.proposalsRefused = proposalsRefused
        rd.proposalsUnknown = proposalsUnknown
        proposalsPlaced.removeAll()
        proposalsRefused.removeAll()
        proposalsUnknown.removeAll()
        awaitingAdvance = true
        return rd
    }

    /// Whether `m` may leave before this Ready's entries and hard state are durable.
    private func mayGoBeforePersist(_ m: Message, inline: Bool) -> Bool {
        if role == .leader {
            // A leader's appends do not depend on its own disk: it may send them while it persists the same entries
            // (thesis §10.2.1), because it counts itself toward a quorum only once they are durable. (Not while
            // this leader's own term is unsaved: a single voter elects itself within one turn.)
            guard !hardStateMustPersist, m.term == term else { return false }
            // A placement (`proposeResponse`) may go before the entries are durable too: the follower matches the
            // entry by index and term, which no other entry has, durable or not. With asynchronous storage writes,
            // nothing else a leader of this term sends depends on its disk either (heartbeats, read
            // confirmations): none of it waits behind a write. (A snapshot message stays with the rest: the shell
            // turns it into a stream.)
            return m.kind == .append || m.kind == .proposeResponse || (config.asyncStorageWrites && m.kind != .snapshot)
        }
        // A follower's forwarded proposals and reads say nothing of its own log: they need not wait for its disk,
        // unless this Ready must be durable before anything (a term or vote changed). (Its answers to heartbeats
        // could go early too; measured side by side, that was slower.)
        return !inline && (m.kind == .propose || m.kind == .readIndex)
    }

    /// The shell has carried out `rd`.
    public mutating func advance(_ rd: Ready) {
        awaitingAdvance = false
        if rd.snapshot != nil && rd.snapshot == snapshotToInstall { snapshotToInstall = nil }
        if let hs = rd.hardState { persistedHardState = hs }
        if let last = rd.entries.last {
            log.handedOut(through: last.index)
            if rd.persistInline {
                log.stableTo(index: last.index, term: last.term)
                committedIfLeader()
            }
        }
        if let last = rd.committedEntries.last {
            log.appliedTo(last.index)
        }
    }

    /// With asynchronous storage writes: the store has made the entries of a `Ready` whose `persistInline` was false
    /// durable, up to its last entry (`index`, `term`); `epoch` is that Ready's. Ignored if the log was truncated or
    /// replaced since it was handed out (a later write carries what replaced it, and its report covers the rest).
    /// Reports must come in the order the writes were handed out. Not between `ready()` and `advance(_:)`.
    public mutating func persisted(through index: UInt64, term: UInt64, epoch: UInt64) {
        precondition(!awaitingAdvance, "persisted(through:term:epoch:) between ready() and advance()")
        log.persisted(through: index, term: term, epoch: epoch)
        committedIfLeader()
    }

    /// A leader whose own log grew more durable may commit further, and tells the followers at once.
    private mutating func committedIfLeader() {
        if role == .leader, maybeCommit() {
            broadcastAppend(sendIfEmpty: true)
        }
    }

    // MARK: - Roles

    private var knownLeader: NodeID? { leader == .none ? nil : leader }

    private mutating func resetTimers() {
        electionElapsed = 0
        heartbeatElapsed = 0
        randomizedElectionTimeout = config.electionTicks + Int(rng.next() % UInt64(config.electionTicks))
    }

    private mutating func becomeFollower(term newTerm: UInt64, leader newLeader: NodeID) {
        if role == .leader { dropReads() }
        if newTerm != term || newLeader != leader { dropForwardedReads() }
        leadTransferee = .none
        if newTerm != term {
            term = newTerm
            vote = .none
        }
        role = .follower
        leader = newLeader
        progress = [:]
        votes = [:]
        resetTimers()
    }

    private mutating func becomePreCandidate() {
        dropForwardedReads()
        role = .preCandidate
        leader = .none
        votes = [:]
        resetTimers()
        requestVotes(kind: .preVote, term: term + 1)
    }

    private mutating func becomeCandidate(transfer: Bool = false) {
        dropForwardedReads()
        term += 1
        vote = config.id
        role = .candidate
        leader = .none
        votes = [:]
        resetTimers()
        requestVotes(kind: .vote, term: term, context: transfer ? Message.transferContext : 0)
    }

    private mutating func requestVotes(kind: Message.Kind, term voteTerm: UInt64, context: UInt64 = 0) {
        votes[config.id] = true
        if tallyDecided() { return }
        for id in membership.voters where id != config.id {
            send(
                Message(
                    kind: kind, from: config.id, to: id, term: voteTerm, logTerm: log.lastTerm, index: log.lastIndex,
                    context: context))
        }
    }

    private mutating func tally(from: NodeID, granted: Bool) {
        guard votes[from] == nil, membership.isVoter(from) else { return }
        votes[from] = granted
        _ = tallyDecided()
    }

    /// Acts on the votes so far; returns whether the election is decided.
    private mutating func tallyDecided() -> Bool {
        let granted = votes.values.filter { $0 }.count
        let rejected = votes.count - granted
        if granted >= quorum {
            if role == .preCandidate {
                becomeCandidate()
            } else {
                becomeLeader()
            }
            return true
        }
        if rejected >= quorum {
            becomeFollower(term: term, leader: .none)
            return true
        }
        return false
    }

    private mutating func becomeLeader() {
        role = .leader
        leader = config.id
        votes = [:]
        resetTimers()
        progress = [:]
        leadTransferee = .none
        for id in peers { progress[id] = Progress(next: log.lastIndex + 1) }
        // The no-op lets this leader commit entries of earlier terms (the Figure 8 rule forbids counting them).
        log.append([Entry(term: term, index: log.lastIndex + 1, kind: .noop)])
        broadcastAppend(sendIfEmpty: true)
    }

    // MARK: - Followers

    private mutating func handleVoteRequest(_ m: Message) {
        let responseKind: Message.Kind = m.kind == .vote ? .voteResponse : .preVoteResponse
        let canVote =
            vote == m.from || (vote == .none && leader == .none) || (m.kind == .preVote && m.term > term)
        if canVote && log.isUpToDate(lastIndex: m.index, lastTerm: m.logTerm) {
            // A granted PreVote answers in the candidate's future term, so it counts there.
            send(Message(kind: responseKind, from: config.id, to: m.from, term: m.term))
            if m.kind == .vote {
                electionElapsed = 0
                vote = m.from
            }
        } else {
            send(Message(kind: responseKind, from: config.id, to: m.from, term: term, reject: true))
        }
    }

    private mutating func handleAppend(_ m: Message) {
        if m.index < log.committed {
            send(Message(kind: .appendResponse, from: config.id, to: m.from, term: term, index: log.committed))
            return
        }
        if log.matches(index: m.index, term: m.logTerm) {
            let (lastNew, replacedFrom) = log.merge(after: m.index, new: m.entries)
            // A config entry arrived, or the one in effect was replaced: the membership follows the log.
            if m.entries.contains(where: { $0.kind == .config }) || replacedFrom.map({ $0 <= membershipIndex }) == true {
                recomputeMembership()
            }
            log.commitTo(min(m.commit, lastNew))
            send(Message(kind: .appendResponse, from: config.id, to: m.from, term: term, index: lastNew))
        } else {
            // Fast back-off: point the leader at the last entry whose term is no greater than the one it sent,
            // so it skips whole terms of mismatching entries instead of one index per round trip.
            let hint = log.lastIndex(atOrBefore: min(m.index, log.lastIndex), withTermAtMost: m.logTerm)
            send(
                Message(
                    kind: .appendResponse, from: config.id, to: m.from, term: term, logTerm: log.term(at: hint) ?? 0,
                    index: m.index, reject: true, rejectHint: hint))
        }
    }

    private mutating func handleHeartbeat(_ m: Message) {
        // The leader sends min(match, commit), so this never commits an entry that differs from the leader's.
        log.commitTo(min(m.commit, log.lastIndex))
        send(Message(kind: .heartbeatResponse, from: config.id, to: m.from, term: term, context: m.context))
    }

    // MARK: - Leader

    private mutating func handleAppendResponse(_ m: Message) {
        guard progress[m.from] != nil else { return }
        progress[m.from]!.silentTicks = 0
        if m.reject {
            let hint =
                m.logTerm > 0 ? log.lastIndex(atOrBefore: m.rejectHint, withTermAtMost: m.logTerm) : m.rejectHint
            if progress[m.from]!.decrease(rejected: m.index, hint: hint) {
                sendAppend(to: m.from, sendIfEmpty: true)
            }
            return
        }
        if progress[m.from]!.update(matched: m.index) {
            switch progress[m.from]!.state {
            case .probe:
                progress[m.from]!.becomeReplicate()
            case .snapshot:
                // Installed (or no longer needed): the follower can be served from the log again.
                if progress[m.from]!.match >= log.offset { progress[m.from]!.becomeProbe() }
            case .replicate:
                break
            }
            if maybeCommit() { broadcastAppend(sendIfEmpty: true) }
        }
        if m.from == leadTransferee && progress[m.from]!.match == log.lastIndex {
            send(Message(kind: .timeoutNow, from: config.id, to: m.from, term: term))
        }
        while sendAppend(to: m.from, sendIfEmpty: false) {}
    }

    private mutating func handleSnapshot(_ m: Message) {
        guard let meta = m.snapshot else { return }
        if meta.index <= log.committed {
            // Old news: say how far this node is.
            send(Message(kind: .appendResponse, from: config.id, to: m.from, term: term, index: log.committed))
            return
        }
        if log.matches(index: meta.index, term: meta.term) {
            // The log already holds the snapshot's last entry: keep the log, commit up to it.
            log.commitTo(meta.index)
        } else {
            log.restore(meta)
            snapshot = meta
            snapshotToInstall = meta
            recomputeMembership()
        }
        send(Message(kind: .appendResponse, from: config.id, to: m.from, term: term, index: log.committed))
    }

    private mutating func handleHeartbeatResponse(_ m: Message) {
        guard var pr = progress[m.from] else { return }
        pr.silentTicks = 0
        pr.probeSent = false
        if pr.match < log.lastIndex && pr.state == .replicate && pr.match == pr.matchAtLastHeartbeat {
            // A follower that made no progress for several heartbeat rounds in replicate state has lost an append
            // (streamed appends are not retransmitted on their own): fall back to probing from its match.
            pr.stalledRounds += 1
            if pr.stalledRounds >= Self.stalledRoundsBeforeProbe { pr.becomeProbe() }
        } else {
            pr.stalledRounds = 0
        }
        pr.matchAtLastHeartbeat = pr.match
        progress[m.from] = pr
        if pr.match < log.lastIndex || pr.state == .probe {
            // A probe goes out even with nothing new to send: it is how a new or lagging member is found.
            sendAppend(to: m.from, sendIfEmpty: pr.state == .probe)
        }
        if m.context != 0 { acknowledgeRead(context: m.context, from: m.from) }
    }

    /// Sends the next append to `to`, if its window allows. Returns whether a message was sent.
    @discardableResult
    private mutating func sendAppend(to id: NodeID, sendIfEmpty: Bool) -> Bool {
        guard var pr = progress[id], !pr.isPaused(maxInflight: config.maxInflightMessages) else { return false }
        let prevIndex = pr.next - 1
        guard let prevTerm = log.term(at: prevIndex) else {
            // The entries it needs are compacted away: send the snapshot instead.
            guard let snapshot else { return false }
            send(Message(kind: .snapshot, from: config.id, to: id, term: term, snapshot: snapshot))
            pr.becomeSnapshot(snapshot.index)
            progress[id] = pr
            return false
        }
        let entries =
            pr.next <= log.lastIndex
            ? log.slice(from: pr.next, to: log.lastIndex, maxBytes: config.maxBytesPerMessage) : []
        if entries.isEmpty && !sendIfEmpty { return false }
        send(
            Message(
                kind: .append, from: config.id, to: id, term: term, logTerm: prevTerm, index: prevIndex,
                entries: entries, commit: log.committed))
        switch pr.state {
        case .replicate:
            if let last = entries.last {
                pr.next = last.index + 1
                pr.inflight.append(last.index)
            }
        case .probe:
            pr.probeSent = true
        case .snapshot:
            break  // paused: unreachable
        }
        progress[id] = pr
        return true
    }

    /// Sends to every follower as much as its window allows.
    private mutating func broadcastAppend(sendIfEmpty: Bool) {
        for id in peers where sendAppend(to: id, sendIfEmpty: sendIfEmpty) {
            while sendAppend(to: id, sendIfEmpty: false) {}
        }
    }

    private mutating func broadcastHeartbeat(context: UInt64) {
        for id in peers {
            let commit = min(progress[id]?.match ?? 0, log.committed)
            send(Message(kind: .heartbeat, from: config.id, to: id, term: term, commit: commit, context: context))
        }
    }

    /// Advances the commit index to the highest index durable on a quorum, if that entry is of this term.
    private mutating func maybeCommit() -> Bool {
        var matches = membership.voters.map { $0 == config.id ? log.stable : progress[$0]?.match ?? 0 }
        guard !matches.isEmpty else { return false }
        matches.sort(by: >)
        let candidate = matches[quorum - 1]
        guard candidate > log.committed, log.term(at: candidate) == term else { return false }
        let firstInTerm = !committedInOwnTerm
        log.commitTo(candidate)
        if firstInTerm {
            // This leader's first commit: reads that waited for it may now pick a read index.
            readsQueued.append(contentsOf: readsAwaitingCommit)
            readsAwaitingCommit.removeAll()
        }
        if !isVoter && log.committed >= membershipIndex {
            // This leader's removal is committed: hand over to the most up-to-date voter and step down.
            if let next = bestTransferTarget, progress[next]!.match == log.lastIndex {
                send(Message(kind: .timeoutNow, from: config.id, to: next, term: term))
            }
            becomeFollower(term: term, leader: .none)
            return false
        }
        return true
    }

    // MARK: - Membership

    private mutating func recomputeMembership() {
        if let e = log.lastConfig(atOrBefore: log.lastIndex), let m = try? Membership(decoding: e.data) {
            setMembership(m, at: e.index)
        } else if let snapshot {
            setMembership(snapshot.membership, at: snapshot.index)
        } else {
            setMembership(Membership(voters: config.voters), at: 0)
        }
    }

    /// The membership in effect as of `index` (for a snapshot's metadata).
    private func membershipAt(_ index: UInt64) -> Membership {
        if let e = log.lastConfig(atOrBefore: index), let m = try? Membership(decoding: e.data) { return m }
        return snapshot?.membership ?? Membership(voters: config.voters)
    }

    private mutating func setMembership(_ m: Membership, at index: UInt64) {
        membership = m
        membershipIndex = index
        if role == .leader {
            for id in peers where progress[id] == nil { progress[id] = Progress(next: log.lastIndex + 1) }
            for id in progress.keys where !m.contains(id) { progress.removeValue(forKey: id) }
            if leadTransferee != .none && !m.isVoter(leadTransferee) { leadTransferee = .none }
        } else if (role == .candidate || role == .preCandidate) && !isVoter {
            becomeFollower(term: term, leader: .none)
        }
    }

    // MARK: - ReadIndex

    private mutating func startReadRound() {
        guard role == .leader, !readsQueued.isEmpty else { return }
        let round = ReadRound(
            context: nextReadContext, index: log.committed, requests: readsQueued, acks: isVoter ? [config.id] : [])
        nextReadContext += 1
        readsQueued.removeAll()
        readRounds.append(round)
        if round.acks.count >= quorum {
            completeReadRounds(through: round.context)
        } else {
            broadcastHeartbeat(context: round.context)
        }
    }

    /// Whether a voter's read request, in this leader's term, confirms by itself that this node still leads: true
    /// when this leader and the asker make a quorum (two or three voters) and the leader has committed an entry of its term.
    ///
    /// Why it is safe (thesis §6.4 asks for a heartbeat round after the read index is taken): the asker sent the
    /// request after its reads were asked, and was then in this term, so it had voted for no later leader; this
    /// node is in this term now, so it had not either. A leader of a later term needs a quorum, which includes one
    /// of the two; so none existed when the reads were asked, every write completed before them was committed by
    /// this leader or an earlier one, and this leader's commit index holds it. (A leader that a later one has
    /// replaced commits nothing once the asker voted for that one, so what it holds is a prefix of the history, as
    /// a round would confirm.) It holds across membership changes: they come one server at a time, each only after
    /// the last committed, and only once this leader has committed an entry of its term, so the membership of any
    /// later leader is this one (committed or pending) or differs from it by one server, and every quorum of those
    /// includes this leader or the asker. The request confirms only its own reads: another read already waiting may
    /// have been asked after it was sent, and waits for its round.
    private func confirmedByRequest(from asker: NodeID) -> Bool {
        asker != config.id && isVoter && membership.isVoter(asker) && quorum <= 2 && committedInOwnTerm
    }

    private mutating func acknowledgeRead(context: UInt64, from: NodeID) {
        guard let i = readRounds.firstIndex(where: { $0.context == context }) else { return }
        guard membership.isVoter(from) else { return }
        readRounds[i].acks.insert(from)
        if readRounds[i].acks.count >= quorum {
            completeReadRounds(through: context)
        }
    }

    /// A quorum confirmed leadership after round `context` started, so it and every earlier round are safe.
    private mutating func completeReadRounds(through context: UInt64) {
        while let first = readRounds.first, first.context <= context {
            var local: [UInt64] = []
            for request in first.requests {
                switch request {
                case .local(let id): local.append(id)
                case .remote(let from, let batch):
                    send(Message(kind: .readIndexResponse, from: config.id, to: from, term: term, index: first.index, context: batch))
                }
            }
            if !local.isEmpty { readyReads.append(ReadState(index: first.index, requests: local)) }
            readRounds.removeFirst()
        }
    }

    /// This node stops leading: its reads are dropped, and the followers whose reads it held are told so.
    private mutating func dropReads() {
        for request in readsAwaitingCommit + readsQueued + readRounds.flatMap(\.requests) {
            switch request {
            case .local(let id): droppedReads.append(id)
            case .remote(let from, let batch):
                send(Message(kind: .readIndexResponse, from: config.id, to: from, term: term, reject: true, context: batch))
            }
        }
        readsAwaitingCommit.removeAll()
        readsQueued.removeAll()
        readRounds.removeAll()
    }

    /// A follower sends the reads asked since the last `Ready` to its leader, as one batch.
    private mutating func forwardReads() {
        guard !readsToForward.isEmpty else { return }
        guard role == .follower, leader != .none else {
            droppedReads.append(contentsOf: readsToForward)
            readsToForward.removeAll()
            return
        }
        let context = nextForwardContext
        nextForwardContext &+= 1
        forwardedReads[context] = ForwardedReads(requests: readsToForward, sentAt: ticks)
        readsToForward.removeAll()
        send(Message(kind: .readIndex, from: config.id, to: leader, term: term, context: context))
    }

    /// What a follower asked of a leader it no longer follows (or never got an answer from) is given up: reads
    /// are dropped, proposals not sent are refused, proposals sent have an unknown outcome.
    private mutating func dropForwardedReads() {
        droppedReads.append(contentsOf: readsToForward)
        readsToForward.removeAll()
        for batch in forwardedReads.values { droppedReads.append(contentsOf: batch.requests) }
        forwardedReads.removeAll()
        proposalsRefused.append(contentsOf: proposalsToForward.map(\.request))
        proposalsToForward.removeAll()
        for batch in forwardedProposals.values { proposalsUnknown.append(contentsOf: batch.requests) }
        forwardedProposals.removeAll()
    }

    /// A forwarded batch unanswered for an election timeout is given up: the message or its answer was lost.
    private mutating func expireForwardedReads() {
        for (context, batch) in forwardedReads where ticks - batch.sentAt >= config.electionTicks {
            droppedReads.append(contentsOf: batch.requests)
            forwardedReads[context] = nil
        }
        // Proposals wait longer: the leader answers once it has appended them, and a change of leader or a closed
        // connection gives them up at once anyway.
        for (context, batch) in forwardedProposals where ticks - batch.sentAt >= 3 * config.electionTicks {
            proposalsUnknown.append(contentsOf: batch.requests)
            forwardedProposals[context] = nil
        }
    }

    /// A follower sends the proposals asked since the last `Ready` to its leader, as one batch.
    private mutating func forwardProposals() {
        guard !proposalsToForward.isEmpty else { return }
        guard role == .follower, leader != .none else {
            proposalsRefused.append(contentsOf: proposalsToForward.map(\.request))
            proposalsToForward.removeAll()
            return
        }
        // Batches of at most `maxBytesPerMessage` (but one proposal each at least), as appends are: a frame stays
        // within what the peer port takes.
        var start = 0
        while start < proposalsToForward.count {
            var end = start + 1
            var bytes = proposalsToForward[start].data.count
            while end < proposalsToForward.count, bytes + proposalsToForward[end].data.count <= config.maxBytesPerMessage {
                bytes += proposalsToForward[end].data.count
                end += 1
            }
            let batch = proposalsToForward[start..<end]
            let context = nextForwardContext
            nextForwardContext &+= 1
            forwardedProposals[context] = ForwardedReads(requests: batch.map(\.request), sentAt: ticks)
            let entries = batch.map { Entry(term: 0, index: 0, kind: .normal, data: $0.data) }
            send(Message(kind: .propose, from: config.id, to: leader, term: term, entries: entries, context: context))
            start = end
        }
        proposalsToForward.removeAll()
    }

    /// The leader appends a follower's batch as normal entries (whatever kind they claim: a follower proposes no
    /// membership change) and says where, or refuses the whole batch.
    private mutating func handleForwardedProposals(_ m: Message) {
        guard !m.entries.isEmpty else { return }
        switch propose(m.entries.map(\.data)) {
        case .success(let ticket):
            send(Message(kind: .proposeResponse, from: config.id, to: m.from, term: term, logTerm: ticket.term, index: ticket.firstIndex, context: m.context))
        case .failure:
            send(Message(kind: .proposeResponse, from: config.id, to: m.from, term: term, reject: true, context: m.context))
        }
    }

    private mutating func send(_ m: Message) {
        outbox.append(m)
    }
}

/// Where the leader put a proposal a follower forwarded: it is this follower's once an entry at `index` with
/// `term` is applied (any other term there means it was overwritten).
public struct ForwardedProposal: Sendable, Hashable {
    public var request: UInt64
    public var term: UInt64
    public var index: UInt64
}

/// Where a leader put a batch of proposals.
public struct ProposalTicket: Sendable, Hashable {
    public var term: UInt64
    public var firstIndex: UInt64
    public var lastIndex: UInt64
}

/// One batch of work for the shell. See `Raft` for the order in which to carry it out.
public struct Ready: Sendable {
    /// A snapshot received from the leader: make it durable (its bytes arrived beside the message), drop the whole
    /// log, and restore the state machine from it, before anything else in this batch.
    public var snapshot: SnapshotMetadata?
    /// The hard state to persist, if it changed.
    public var hardState: HardState?
    /// Entries to persist. Any stored entry at or after `entries.first!.index` is replaced.
    public var entries: [Entry] = []
    /// Messages that may be sent before `entries` and `hardState` are durable (a leader's appends).
    public var messagesBeforePersist: [Message] = []
    /// Messages to send once `entries` and `hardState` are durable.
    public var messages: [Message] = []
    /// Committed entries to apply, in order.
    public var committedEntries: [Entry] = []
    /// Reads confirmed by a quorum: serve each once the applied index reaches its `index`.
    public var readStates: [ReadState] = []
    /// Reads that will never be confirmed here (leadership was lost): answer them "not the leader".
    public var droppedReads: [UInt64] = []
    /// Proposals this follower forwarded, placed by the leader: answer each when its entry is applied. Before the
    /// committed entries of the same batch are applied.
    public var proposalsPlaced: [ForwardedProposal] = []
    /// Forwarded proposals the leader certainly did not append (never sent, or refused): safe to try elsewhere.
    public var proposalsRefused: [UInt64] = []
    /// Forwarded proposals sent and never answered (the leader changed, its connection closed, the answer was
    /// lost): they may or may not be appended.
    public var proposalsUnknown: [UInt64] = []

    /// Whether this batch must be durable before the shell steps anything else: always, unless the node runs with
    /// `RaftConfig.asyncStorageWrites`; then only when a term or vote changed or a snapshot is to be installed.
    /// Otherwise the shell may persist it in the background, send `messages` after it is durable (in order with
    /// the batches before), and report it with `Raft.persisted(through:term:epoch:)`.
    public var persistInline = true
    /// The log's epoch when this batch was handed out: a report of its write names it (`Raft.persisted`).
    public var epoch: UInt64 = 0

    /// Whether persisting this batch needs an fsync.
    public var mustSync: Bool { !entries.isEmpty || hardState != nil || snapshot != nil }
}
