/// Identifies a member of a Raft group. Zero means "nobody".
public typealias NodeID = UInt64

extension NodeID {
    /// The absence of a node (no vote, no known leader).
    public static let none: NodeID = 0
}

/// A log entry. Its `data` is opaque to Raft.
public struct Entry: Sendable, Hashable {
    public enum Kind: UInt8, Sendable {
        /// A client proposal.
        case normal = 0
        /// The empty entry a new leader appends to commit entries of earlier terms (Raft §5.4.2, thesis §6.4).
        case noop = 1
        /// A new membership (`Membership.encoded`). It takes effect as soon as it is in a log, committed or not.
        case config = 2
    }

    public var term: UInt64
    public var index: UInt64
    public var kind: Kind
    public var data: [UInt8]

    public init(term: UInt64, index: UInt64, kind: Kind = .normal, data: [UInt8] = []) {
        self.term = term
        self.index = index
        self.kind = kind
        self.data = data
    }

    /// Bytes counted against message and batch size limits.
    public var byteSize: Int { data.count + 24 }
}

/// What must survive a crash besides the log: the current term, the vote cast in it, and the commit index.
public struct HardState: Sendable, Hashable {
    public var term: UInt64
    public var vote: NodeID
    public var commit: UInt64

    public init(term: UInt64 = 0, vote: NodeID = .none, commit: UInt64 = 0) {
        self.term = term
        self.vote = vote
        self.commit = commit
    }
}

/// A message between two members of a Raft group.
///
/// One flat shape for every kind, as etcd-io/raft does: fields a kind does not use stay zero.
public struct Message: Sendable, Hashable {
    public enum Kind: UInt8, Sendable, CaseIterable {
        case preVote = 1
        case preVoteResponse = 2
        case vote = 3
        case voteResponse = 4
        case append = 5
        case appendResponse = 6
        case heartbeat = 7
        case heartbeatResponse = 8
        /// InstallSnapshot: `snapshot` names the snapshot; its bytes travel beside the message (the shell streams them).
        case snapshot = 9
        /// Leader transfer: the recipient campaigns at once, without PreVote and past the followers' lease.
        case timeoutNow = 10
        /// A follower asks the leader for a read index on behalf of its own clients (thesis §6.4: "followers could
        /// also serve reads"). `context` names the follower's batch of reads.
        case readIndex = 11
        /// The leader's answer: `index`, its commit index once a quorum confirmed its leadership after the request
        /// came (or at once when the leader and the asker are a quorum: the request is that confirmation), for the
        /// batch `context`; `reject` if it could not confirm (it is no longer leader).
        case readIndexResponse = 12
        /// A follower hands its clients' proposals to the leader (etcd's MsgProp): `entries` carry their data,
        /// `context` names the batch.
        case propose = 13
        /// The leader's answer: the batch's entries were appended at `index`, `index + 1`, ... in term `logTerm`; or
        /// `reject`: they were not appended (the leader is transferring leadership, or one is too large).
        case proposeResponse = 14
    }

    public var kind: Kind
    public var from: NodeID
    public var to: NodeID
    public var term: UInt64
    /// append: term of the entry before `entries`; appendResponse (rejection): the follower's term at `rejectHint`;
    /// vote requests: the candidate's last log term.
    public var logTerm: UInt64
    /// append: index of the entry before `entries`; appendResponse: the highest index now matching (or the rejected index);
    /// vote requests: the candidate's last log index.
    public var index: UInt64
    public var entries: [Entry]
    /// The sender's commit index (append, heartbeat).
    public var commit: UInt64
    /// appendResponse, voteResponse: the request was refused.
    public var reject: Bool
    /// appendResponse (rejection): the follower's hint of where the logs may match.
    public var rejectHint: UInt64
    /// heartbeat and its response: the ReadIndex round being confirmed (0 for none). vote, preVote:
    /// `Message.transferContext` when the campaign was asked for by the leader (TimeoutNow).
    public var context: UInt64
    /// snapshot: the snapshot to install.
    public var snapshot: SnapshotMetadata?

    /// Marks a vote request made on the leader's request (leader transfer).
    public static let transferContext: UInt64 = 1

    public init(
        kind: Kind, from: NodeID, to: NodeID, term: UInt64, logTerm: UInt64 = 0, index: UInt64 = 0,
        entries: [Entry] = [], commit: UInt64 = 0, reject: Bool = false, rejectHint: UInt64 = 0, context: UInt64 = 0,
        snapshot: SnapshotMetadata? = nil
    ) {
        self.kind = kind
        self.from = from
        self.to = to
        self.term = term
        self.logTerm = logTerm
        self.index = index
        self.entries = entries
        self.commit = commit
        self.reject = reject
        self.rejectHint = rejectHint
        self.context = context
        self.snapshot = snapshot
    }
}

/// Who is in a Raft group: voters, which make quorums, and learners, which receive the log and do not vote.
public struct Membership: Sendable, Hashable, CustomStringConvertible {
    public private(set) var voters: [NodeID]
    public private(set) var learners: [NodeID]

    public init(voters: [NodeID], learners: [NodeID] = []) {
        self.voters = Set(voters).sorted()
        self.learners = Set(learners).subtracting(voters).sorted()
    }

    public var members: [NodeID] { (voters + learners).sorted() }
    public func isVoter(_ id: NodeID) -> Bool { voters.contains(id) }
    public func contains(_ id: NodeID) -> Bool { voters.contains(id) || learners.contains(id) }
    public var quorum: Int { voters.count / 2 + 1 }

    public var description: String { "voters \(voters) learners \(learners)" }

    /// The membership after `change`, or why it cannot be made.
    public func applying(_ change: ConfChange) -> Result<Membership, RaftRefusal> {
        switch change {
        case .addLearner(let id):
            guard id != .none, !contains(id) else { return .failure(.invalidConfChange("\(id) is already a member")) }
            return .success(Membership(voters: voters, learners: learners + [id]))
        case .promote(let id):
            guard learners.contains(id) else { return .failure(.invalidConfChange("\(id) is not a learner")) }
            return .success(Membership(voters: voters + [id], learners: learners.filter { $0 != id }))
        case .remove(let id):
            guard contains(id) else { return .failure(.invalidConfChange("\(id) is not a member")) }
            if voters == [id] { return .failure(.invalidConfChange("cannot remove the last voter \(id)")) }
            return .success(Membership(voters: voters.filter { $0 != id }, learners: learners.filter { $0 != id }))
        }
    }

    /// Bytes of a config entry: the voter count, the voters, then the learners, each a big-endian UInt64.
    public var encoded: [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(8 * (1 + voters.count + learners.count))
        func put(_ v: UInt64) { withUnsafeBytes(of: v.bigEndian) { out.append(contentsOf: $0) } }
        put(UInt64(voters.count))
        for v in voters { put(v) }
        for l in learners { put(l) }
        return out
    }

    public init(decoding bytes: [UInt8]) throws(RaftConfigError) {
        guard bytes.count % 8 == 0, bytes.count >= 8 else {
            throw .invalid("a membership of \(bytes.count) bytes is not a whole number of 8-byte ids")
        }
        var ids: [UInt64] = []
        for i in stride(from: 0, to: bytes.count, by: 8) {
            var v: UInt64 = 0
            for b in bytes[i..<i + 8] { v = v << 8 | UInt64(b) }
            ids.append(v)
        }
        let count = Int(ids[0])
        guard count <= ids.count - 1 else { throw .invalid("a membership claims \(count) voters but holds \(ids.count - 1) ids") }
        self.init(voters: Array(ids[1..<(1 + count)]), learners: Array(ids[(1 + count)...]))
    }
}

/// One change of membership. Changes go one at a time (single-server changes, thesis §4.1).
public enum ConfChange: Sendable, Hashable {
    /// Adds a non-voting member that receives the log.
    case addLearner(NodeID)
    /// Makes a learner a voter, once it has caught up to within `RaftConfig.promotionLag` entries of the leader.
    case promote(NodeID)
    /// Removes a voter or learner.
    case remove(NodeID)
}

/// What identifies a snapshot: the last entry it covers and the membership as of that entry.
public struct SnapshotMetadata: Sendable, Hashable {
    public var index: UInt64
    public var term: UInt64
    public var membership: Membership

    public init(index: UInt64, term: UInt64, membership: Membership) {
        self.index = index
        self.term = term
        self.membership = membership
    }
}

/// A node's role in its current term.
public enum Role: String, Sendable {
    case follower
    case preCandidate
    case candidate
    case leader
}

/// A linearizable read that became ready: once the state machine has applied `index`, the reads in `requests`
/// may be served from it.
public struct ReadState: Sendable, Hashable {
    public var index: UInt64
    public var requests: [UInt64]
}

/// Why the protocol refused a proposal or a read.
public enum RaftRefusal: Error, Sendable, Hashable, CustomStringConvertible {
    /// This node is not the leader; `leader` is the leader it knows of, if any. The caller should retry there.
    case notLeader(leader: NodeID?)
    /// The proposal is larger than the configured maximum entry size.
    case entryTooLarge(size: Int, limit: Int)
    /// A leader transfer is under way; proposals wait for the new leader.
    case transferInProgress(to: NodeID)
    /// A configuration change is still uncommitted (at `index`); one change at a time.
    case configChangeInProgress(index: UInt64)
    /// A new leader must commit an entry of its own term before it changes the configuration.
    case leaderNotReady
    /// A learner may become a voter only once it is within `RaftConfig.promotionLag` entries of the leader.
    case learnerLagging(id: NodeID, match: UInt64, last: UInt64)
    /// The change does not apply to the current membership.
    case invalidConfChange(String)
    /// Leadership cannot go to that node.
    case invalidTransfer(String)

    public var description: String {
        switch self {
        case .notLeader(let leader?): return "not the leader; the leader is \(leader)"
        case .notLeader(nil): return "not the leader; no leader is known"
        case .entryTooLarge(let size, let limit): return "entry of \(size) bytes exceeds the limit of \(limit) bytes"
        case .transferInProgress(let to): return "leadership is being transferred to \(to)"
        case .configChangeInProgress(let index):
            return "a configuration change (index \(index)) is not committed yet; one change at a time"
        case .leaderNotReady: return "the leader has not committed an entry of its term yet"
        case .learnerLagging(let id, let match, let last):
            return "learner \(id) has \(match) of \(last) entries or has not answered the leader lately; it must catch up before promotion"
        case .invalidConfChange(let why): return "invalid configuration change: \(why)"
        case .invalidTransfer(let why): return "cannot transfer leadership: \(why)"
        }
    }
}

/// Every tunable of the protocol, with the defaults in use.
///
/// Time is counted in ticks; the shell decides how long a tick is (`RaftDriver.Options.tickInterval`).
public struct RaftConfig: Sendable, Hashable {
    /// This node.
    public var id: NodeID
    /// The voters a new group starts with (bootstrap). Used only while neither the log nor a snapshot holds a
    /// membership; a node that joins an existing group starts with none and learns it from the leader.
    public var voters: [NodeID]
    /// Ticks without hearing from a leader before a follower campaigns. The real timeout is drawn at random from
    /// `[electionTicks, 2 * electionTicks)` each time it is reset. Default 10.
    public var electionTicks: Int = 10
    /// Ticks between a leader's heartbeats. Must be less than `electionTicks`. Default 1.
    public var heartbeatTicks: Int = 1
    /// Campaign with a PreVote round first, so a node that was cut off does not raise the term on rejoining. Default on.
    public var preVote: Bool = true
    /// A leader that has not heard from a quorum within an election timeout steps down; followers that heard from a
    /// leader within the timeout ignore votes. Default on.
    public var checkQuorum: Bool = true
    /// Upper bound on the bytes of entries in one append message. Default 1 MiB.
    public var maxBytesPerMessage: Int = 1 << 20
    /// Upper bound on append messages in flight to one follower (the pipelining window). Default 256.
    public var maxInflightMessages: Int = 256
    /// Upper bound on the bytes of committed entries handed out in one `Ready`. Default 8 MiB.
    public var maxCommittedBytesPerReady: Int = 8 << 20
    /// Upper bound on the bytes of one proposed entry. Default 1 MiB.
    public var maxEntryBytes: Int = 1 << 20
    /// A learner is promoted only once its log is within this many entries of the leader's. Default 1000.
    public var promotionLag: UInt64 = 1000
    /// Seed of the randomised election timeout and of the contexts of forwarded reads. Zero means "derive from
    /// `id`". A shell draws a fresh one at each start, so that an answer meant for the node's previous incarnation
    /// matches nothing it asks now.
    public var randomSeed: UInt64 = 0
    /// Asynchronous storage writes (etcd's AsyncStorageWrites): the shell may hand a `Ready`'s entries to a writer
    /// and go on stepping while they are made durable, then report them with `Raft.persisted(through:term:epoch:)`. Only a
    /// `Ready` with `persistInline` (a term or vote changed, or a snapshot to install) must be durable before the
    /// next step. Until reported, entries count toward no quorum and are not applied on this node. Default off:
    /// every `Ready` is durable when `advance` is called.
    public var asyncStorageWrites: Bool = false

    public init(id: NodeID, voters: [NodeID]) {
        self.id = id
        self.voters = voters
    }

    /// Checks the configuration and names what is wrong.
    public func validate() throws(RaftConfigError) {
        if id == .none { throw .invalid("id must not be 0") }
        if voters.contains(.none) { throw .invalid("voter id 0 is reserved") }
        if Set(voters).count != voters.count { throw .invalid("voters \(voters) contain duplicates") }
        if heartbeatTicks < 1 { throw .invalid("heartbeatTicks must be at least 1") }
        if electionTicks <= heartbeatTicks { throw .invalid("electionTicks must be greater than heartbeatTicks") }
        if maxInflightMessages < 1 { throw .invalid("maxInflightMessages must be at least 1") }
        if maxBytesPerMessage < 1 { throw .invalid("maxBytesPerMessage must be at least 1") }
    }
}

public enum RaftConfigError: Error, Sendable, Hashable, CustomStringConvertible {
    case invalid(String)
    public var description: String {
        switch self { case .invalid(let why): return "invalid Raft configuration: \(why)" }
    }
}

/// A small, fast, seedable random source (SplitMix64), so that the protocol stays a deterministic value type.
public struct SplitMix64: RandomNumberGenerator, Sendable, Hashable {
    private var state: UInt64
    public init(seed: UInt64) { self.state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
