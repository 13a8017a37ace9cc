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
    /// heartbeat and its response: the ReadIndex round being confirmed (0 for none).
    public var context: UInt64

    public init(
        kind: Kind, from: NodeID, to: NodeID, term: UInt64, logTerm: UInt64 = 0, index: UInt64 = 0,
        entries: [Entry] = [], commit: UInt64 = 0, reject: Bool = false, rejectHint: UInt64 = 0, context: UInt64 = 0
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

    public var description: String {
        switch self {
        case .notLeader(let leader?): return "not the leader; the leader is \(leader)"
        case .notLeader(nil): return "not the leader; no leader is known"
        case .entryTooLarge(let size, let limit): return "entry of \(size) bytes exceeds the limit of \(limit) bytes"
        }
    }
}

/// Every tunable of the protocol, with the defaults in use.
///
/// Time is counted in ticks; the shell decides how long a tick is (`RaftDriver.Options.tickInterval`).
public struct RaftConfig: Sendable, Hashable {
    /// This node.
    public var id: NodeID
    /// The voters of the group, this node included.
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
    /// Seed of the randomised election timeout. Zero means "derive from `id`".
    public var randomSeed: UInt64 = 0

    public init(id: NodeID, voters: [NodeID]) {
        self.id = id
        self.voters = voters
    }

    /// Checks the configuration and names what is wrong.
    public func validate() throws(RaftConfigError) {
        if id == .none { throw .invalid("id must not be 0") }
        if !voters.contains(id) { throw .invalid("id \(id) is not among the voters \(voters)") }
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
