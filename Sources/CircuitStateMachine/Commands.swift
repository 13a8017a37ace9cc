/// What the cluster agrees to do to the control state: one command per Raft entry.
public enum Command: Sendable, Hashable {
    /// A host joins (or rejoins after a restart) with a new session of `ttlMillis`. Its subtree survives a rejoin.
    case registerHost(id: String, peerAddress: String, clientAddress: String, role: HostRole, ttlMillis: UInt64)
    /// A host leaves on its own: its session ends and its subtree goes.
    case leaveHost(id: String)
    /// A session for a client (ephemeral records). Its id is the entry's index. With a `limit` (0: none), refused
    /// (`tooManySessions`) while `owner` already holds that many: the API's per-client limit, decided in the log so
    /// that every replica agrees and two grants racing on different nodes cannot both pass it.
    case grantSession(owner: String, ttlMillis: UInt64, limit: UInt32 = 0)
    /// A session ends: revoked by its owner, or expired by the leader's `LeaseKeeper`. Everything ephemeral it owns
    /// goes in the same entry; if a host owned it, the host is expired and its subtree goes too.
    case endSession(id: SessionID, expired: Bool)
    /// Creates an element; fails if the anchor holds one. `sequential` appends a per-parent counter to the name.
    case create(path: String, element: Element, session: SessionID, sequential: Bool)
    /// Sets a record's value, creating it if absent.
    case put(path: String, value: [UInt8], session: SessionID)
    /// Sets a record's value only if its version is `version` (0: only if absent).
    case compareAndSet(path: String, version: UInt64, value: [UInt8])
    /// Removes an element, only at `version` if given.
    case delete(path: String, version: UInt64?)
    /// The owning host reports a process's new state.
    case updateProc(path: String, state: ProcState)
    /// All or nothing: the operations apply in order as one change, or none does.
    case transaction([TransactionOp])
    /// A live host's role changes (the leader records a promotion or removal it made in Raft's membership).
    case setHostRole(id: String, role: HostRole)
    /// The leader records a job's placement or end.
    case updateJob(path: String, state: JobState)
}

/// One operation of a transaction.
public enum TransactionOp: Sendable, Hashable {
    /// Fails the transaction unless the element's version is `version` (0: absent).
    case check(path: String, version: UInt64)
    case create(path: String, element: Element, session: SessionID, sequential: Bool)
    case put(path: String, value: [UInt8], session: SessionID)
    case delete(path: String, version: UInt64?)
}

/// The answer to a command.
public enum CommandResult: Sendable, Hashable {
    /// Done: the revision it made (unchanged if it changed nothing), and for element commands the path (a
    /// sequential create's full name) and the element's new version; for a session grant, the session.
    case ok(revision: Revision, path: String?, version: UInt64, session: SessionID)
    case failed(ControlError)
}

/// Why a command changed nothing. Each names what was wrong.
public enum ControlError: Error, Sendable, Hashable, CustomStringConvertible {
    case invalidName(path: String, why: String)
    case exists(path: String, kind: String)
    case notFound(path: String)
    case versionMismatch(path: String, expected: UInt64, actual: UInt64)
    case wrongKind(path: String, expected: String, actual: String)
    case noSuchSession(SessionID)
    case noSuchHost(String)
    case hostNotAlive(String)
    /// Operation `index` of a transaction failed; nothing of it applied.
    indirect case transactionFailed(index: Int, ControlError)
    case malformedCommand(String)
    /// `owner` already holds `limit` sessions.
    case tooManySessions(owner: String, limit: UInt32)

    public var description: String {
        switch self {
        case .invalidName(let path, let why): return "invalid name \(path.debugDescription): \(why)"
        case .exists(let path, let kind): return "\(path) already holds a \(kind)"
        case .notFound(let path): return "\(path) holds no element"
        case .versionMismatch(let path, let expected, let actual):
            return "\(path) is at version \(actual), not \(expected)"
        case .wrongKind(let path, let expected, let actual): return "\(path) is a \(actual), not a \(expected)"
        case .noSuchSession(let id): return "no session \(id)"
        case .noSuchHost(let id): return "no host \(id)"
        case .hostNotAlive(let id): return "host \(id) is not alive"
        case .transactionFailed(let index, let error): return "transaction operation \(index) failed: \(error)"
        case .malformedCommand(let why): return "malformed command: \(why)"
        case .tooManySessions(let owner, let limit):
            return "\(owner) already holds \(limit) sessions, the most one client may hold: end one first"
        }
    }
}

/// The rules for names.
public enum Names {
    /// The root of the global records, beside the hosts' subtrees.
    public static let recordsRoot = "/records"
    /// The root of the fault-tolerant jobs, which the leader places on hosts.
    public static let jobsRoot = "/jobs"

    /// Whether `path` is below the jobs' root.
    public static func isJob(_ path: String) -> Bool { path.hasPrefix(jobsRoot + "/") }
    public static let maxPathBytes = 1024
    public static let maxSegmentBytes = 128
    public static let maxDepth = 32

    /// Checks a path and names what is wrong with it: absolute, `/`-separated segments of letters, digits, `.`, `_`
    /// and `-` (not `.` or `..`), at most 128 bytes each, 32 deep and 1,024 bytes in all; rooted at a host
    /// (`/X` + 16 lowercase hex digits) or at `/records`, and below that root.
    public static func validate(_ path: String) -> ControlError? {
        var copy = path
        return copy.withUTF8 { validate(path, bytes: $0) }
    }

    /// One pass over the bytes, no allocation: segment lengths, dots, characters, the root.
    private static func validate(_ path: String, bytes u: UnsafeBufferPointer<UInt8>) -> ControlError? {
        func bad(_ why: String) -> ControlError { .invalidName(path: path, why: why) }
        guard u.count <= maxPathBytes else { return bad("longer than \(maxPathBytes) bytes") }
        guard u.first == UInt8(ascii: "/") else { return bad("must start with /") }
        var segments = 0
        var length = 0
        var dots = 0
        var rootEnd = u.count
        var i = 1
        while true {
            let atEnd = i == u.count
            let b: UInt8 = atEnd ? UInt8(ascii: "/") : u[i]
            if b == UInt8(ascii: "/") {
                if length == 0 { return bad("has an empty segment") }
                if length > maxSegmentBytes { return bad("has a segment longer than \(maxSegmentBytes) bytes") }
                if dots == length && length <= 2 { return bad("has a . or .. segment") }
                segments += 1
                if segments == 1 { rootEnd = i }
                length = 0
                dots = 0
                if atEnd { break }
            } else {
                guard isNameByte(b) else {
                    return bad("has the character \(String(decoding: [b], as: UTF8.self).debugDescription); allowed: letters, digits, . _ -")
                }
                length += 1
                if b == UInt8(ascii: ".") { dots += 1 }
            }
            i += 1
        }
        guard segments >= 2 else { return bad("must name something below a host, \(recordsRoot) or \(jobsRoot)") }
        guard segments <= maxDepth else { return bad("deeper than \(maxDepth) segments") }
        let root = UnsafeBufferPointer(rebasing: u[1..<rootEnd])
        if !root.elementsEqual(recordsRoot.utf8.dropFirst()) && !root.elementsEqual(jobsRoot.utf8.dropFirst()) && !isHostID(root) {
            return bad("must start with a host (X and 16 hex digits), \(recordsRoot) or \(jobsRoot)")
        }
        return nil
    }

    /// `X` followed by 16 lowercase hex digits.
    public static func isHostID(_ s: String) -> Bool { isHostID(s.utf8[...]) }

    static func isHostID<C: Collection<UInt8>>(_ u: C) -> Bool {
        guard u.count == 17, u.first == UInt8(ascii: "X") else { return false }
        return u.dropFirst().allSatisfy { (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) || (UInt8(ascii: "a")...UInt8(ascii: "f")).contains($0) }
    }

    /// The host owning a path, if it is under one.
    public static func host(of path: String) -> String? {
        // "/X" + 16 hex digits, then the end or "/".
        let u = path.utf8
        guard u.count >= 18, u.first == UInt8(ascii: "/") else { return nil }
        let start = u.index(after: u.startIndex)
        let end = u.index(start, offsetBy: 17)
        guard end == u.endIndex || u[end] == UInt8(ascii: "/"), isHostID(path[start..<end].utf8) else { return nil }
        return String(path[start..<end])
    }

    static func parent(of path: String) -> String {
        // On the UTF-8 view: no grapheme breaking on this hot path.
        guard let slash = path.utf8.lastIndex(of: UInt8(ascii: "/")), slash != path.startIndex else { return "/" }
        return String(path[..<slash])
    }

    private static func isNameByte(_ b: UInt8) -> Bool {
        (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(b) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(b)
            || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b) || b == UInt8(ascii: ".") || b == UInt8(ascii: "_")
            || b == UInt8(ascii: "-")
    }
}
