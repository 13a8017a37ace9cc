/// Writes the compact, versioned binary forms of commands and snapshots: big-endian integers, length-prefixed
/// byte strings.
struct BinaryWriter {
    var bytes: [UInt8] = []

    // Every replica applies every command and writes its watch event: these run for each write on the cluster, so
    // they append bytes directly (no intermediate arrays, no generic sequence copies).
    @inline(__always)
    mutating func int<T: FixedWidthInteger>(_ v: T) {
        var shift = T.bitWidth - 8
        while shift >= 0 {
            bytes.append(UInt8(truncatingIfNeeded: v >> shift))
            shift -= 8
        }
    }
    mutating func blob(_ b: [UInt8]) {
        int(UInt32(b.count))
        bytes.append(contentsOf: b)
    }
    mutating func string(_ s: String) {
        let utf8 = s.utf8
        int(UInt32(utf8.count))
        bytes.append(contentsOf: utf8)
    }
    mutating func strings(_ ss: [String]) {
        int(UInt32(ss.count))
        for s in ss { string(s) }
    }
    mutating func bool(_ b: Bool) { bytes.append(b ? 1 : 0) }
}

/// Reads what `BinaryWriter` wrote; every failure names the field.
struct BinaryReader {
    let bytes: [UInt8]
    var at = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var isAtEnd: Bool { at == bytes.count }

    mutating func int<T: FixedWidthInteger>(_ field: String) throws(ControlError) -> T {
        let n = MemoryLayout<T>.size
        guard at + n <= bytes.count else { throw .malformedCommand("ends inside \(field)") }
        return readInt(n)
    }
    /// The `n` bytes at `at` as a big-endian integer (the caller checked they are there).
    @inline(__always)
    private mutating func readInt<T: FixedWidthInteger>(_ n: Int) -> T {
        var v: T = 0
        bytes.withUnsafeBufferPointer { b in
            for i in at..<at + n { v = v << 8 | T(truncatingIfNeeded: b[i]) }
        }
        at += n
        return v
    }
    /// A length-prefixed field's bytes: their start and count (the field's name is only put together for an error).
    private mutating func span(_ field: String) throws(ControlError) -> Range<Int> {
        guard at + 4 <= bytes.count else { throw .malformedCommand("ends inside \(field) length") }
        let n = Int(readInt(4) as UInt32)
        guard at + n <= bytes.count else { throw .malformedCommand("\(field) overruns the input") }
        defer { at += n }
        return at..<at + n
    }
    mutating func blob(_ field: String) throws(ControlError) -> [UInt8] {
        Array(bytes[try span(field)])
    }
    mutating func string(_ field: String) throws(ControlError) -> String {
        let range = try span(field)
        return bytes.withUnsafeBufferPointer { String(decoding: UnsafeBufferPointer(rebasing: $0[range]), as: UTF8.self) }
    }
    mutating func strings(_ field: String) throws(ControlError) -> [String] {
        let n: UInt32 = try int(field + " count")
        guard Int(n) <= (bytes.count - at) / 4 else { throw .malformedCommand("\(field) claims \(n) strings") }
        var out: [String] = []
        for _ in 0..<n { out.append(try string(field)) }
        return out
    }
    mutating func bool(_ field: String) throws(ControlError) -> Bool { (try int(field) as UInt8) != 0 }
}

extension Command {
    public static let formatVersion: UInt8 = 1

    /// The bytes of a Raft entry carrying this command.
    public var encoded: [UInt8] {
        var w = BinaryWriter()
        w.int(Self.formatVersion)
        switch self {
        case .registerHost(let id, let peer, let client, let role, let ttl):
            w.int(UInt8(1)); w.string(id); w.string(peer); w.string(client); w.int(role.rawValue); w.int(ttl)
        case .leaveHost(let id):
            w.int(UInt8(2)); w.string(id)
        case .grantSession(let owner, let ttl, 0):
            w.int(UInt8(3)); w.string(owner); w.int(ttl)
        case .grantSession(let owner, let ttl, let limit):
            // A tag of its own, so that grants without a limit keep their old bytes and no truncation of these
            // reads as one of those.
            w.int(UInt8(13)); w.string(owner); w.int(ttl); w.int(limit)
        case .endSession(let id, let expired):
            w.int(UInt8(4)); w.int(id); w.bool(expired)
        case .create(let path, let element, let session, let sequential):
            w.int(UInt8(5)); w.string(path); element.write(to: &w); w.int(session); w.bool(sequential)
        case .put(let path, let value, let session):
            w.int(UInt8(6)); w.string(path); w.blob(value); w.int(session)
        case .compareAndSet(let path, let version, let value):
            w.int(UInt8(7)); w.string(path); w.int(version); w.blob(value)
        case .delete(let path, let version):
            w.int(UInt8(8)); w.string(path); w.bool(version != nil); w.int(version ?? 0)
        case .updateProc(let path, let state):
            w.int(UInt8(9)); w.string(path); state.write(to: &w)
        case .setHostRole(let id, let role):
            w.int(UInt8(11)); w.string(id); w.int(role.rawValue)
        case .updateJob(let path, let state):
            w.int(UInt8(12)); w.string(path); state.write(to: &w)
        case .transaction(let ops):
            w.int(UInt8(10)); w.int(UInt32(ops.count))
            for op in ops {
                switch op {
                case .check(let path, let version):
                    w.int(UInt8(1)); w.string(path); w.int(version)
                case .create(let path, let element, let session, let sequential):
                    w.int(UInt8(2)); w.string(path); element.write(to: &w); w.int(session); w.bool(sequential)
                case .put(let path, let value, let session):
                    w.int(UInt8(3)); w.string(path); w.blob(value); w.int(session)
                case .delete(let path, let version):
                    w.int(UInt8(4)); w.string(path); w.bool(version != nil); w.int(version ?? 0)
                }
            }
        }
        return w.bytes
    }

    /// Decodes an entry's bytes; bad bytes give an error naming what is wrong, never a crash.
    public init(decoding bytes: [UInt8]) throws(ControlError) {
        var r = BinaryReader(bytes)
        let version: UInt8 = try r.int("format version")
        guard version == Self.formatVersion else { throw .malformedCommand("format version \(version)") }
        let tag: UInt8 = try r.int("command tag")
        switch tag {
        case 1:
            let id = try r.string("host id"), peer = try r.string("peer address"), client = try r.string("client address")
            let rawRole: UInt8 = try r.int("role")
            guard let role = HostRole(rawValue: rawRole) else { throw .malformedCommand("host role \(rawRole)") }
            self = .registerHost(id: id, peerAddress: peer, clientAddress: client, role: role, ttlMillis: try r.int("ttl"))
        case 2: self = .leaveHost(id: try r.string("host id"))
        case 3: self = .grantSession(owner: try r.string("owner"), ttlMillis: try r.int("ttl"))
        case 13:
            let owner = try r.string("owner"), ttl: UInt64 = try r.int("ttl"), limit: UInt32 = try r.int("session limit")
            guard limit > 0 else { throw .malformedCommand("a session limit of 0 (a grant without one has tag 3)") }
            self = .grantSession(owner: owner, ttlMillis: ttl, limit: limit)
        case 4: self = .endSession(id: try r.int("session"), expired: try r.bool("expired"))
        case 5:
            self = .create(
                path: try r.string("path"), element: try Element(from: &r), session: try r.int("session"),
                sequential: try r.bool("sequential"))
        case 6: self = .put(path: try r.string("path"), value: try r.blob("value"), session: try r.int("session"))
        case 7: self = .compareAndSet(path: try r.string("path"), version: try r.int("version"), value: try r.blob("value"))
        case 8:
            let path = try r.string("path")
            let has = try r.bool("has version")
            let v: UInt64 = try r.int("version")
            self = .delete(path: path, version: has ? v : nil)
        case 9: self = .updateProc(path: try r.string("path"), state: try ProcState(from: &r))
        case 10:
            let n: UInt32 = try r.int("operation count")
            guard Int(n) <= bytes.count else { throw .malformedCommand("a transaction claims \(n) operations") }
            var ops: [TransactionOp] = []
            for _ in 0..<n {
                let opTag: UInt8 = try r.int("operation tag")
                switch opTag {
                case 1: ops.append(.check(path: try r.string("path"), version: try r.int("version")))
                case 2:
                    ops.append(
                        .create(
                            path: try r.string("path"), element: try Element(from: &r), session: try r.int("session"),
                            sequential: try r.bool("sequential")))
                case 3: ops.append(.put(path: try r.string("path"), value: try r.blob("value"), session: try r.int("session")))
                case 4:
                    let path = try r.string("path")
                    let has = try r.bool("has version")
                    let v: UInt64 = try r.int("version")
                    ops.append(.delete(path: path, version: has ? v : nil))
                default: throw .malformedCommand("transaction operation tag \(opTag)")
                }
            }
            self = .transaction(ops)
        case 11:
            let id = try r.string("host id")
            let rawRole: UInt8 = try r.int("role")
            guard let role = HostRole(rawValue: rawRole) else { throw .malformedCommand("host role \(rawRole)") }
            self = .setHostRole(id: id, role: role)
        case 12: self = .updateJob(path: try r.string("path"), state: try JobState(from: &r))
        default:
            throw .malformedCommand("command tag \(tag)")
        }
        guard r.isAtEnd else { throw .malformedCommand("\(bytes.count - r.at) bytes after the command") }
    }
}

extension Element {
    func write(to w: inout BinaryWriter) {
        switch self {
        case .chan(let capacity): w.int(UInt8(1)); w.int(capacity)
        case .proc(let state): w.int(UInt8(2)); state.write(to: &w)
        case .select(let clauses): w.int(UInt8(3)); w.blob(clauses)
        case .subscription(let kind): w.int(UInt8(4)); w.int(kind.rawValue)
        case .record(let value): w.int(UInt8(5)); w.blob(value)
        case .job(let state): w.int(UInt8(6)); state.write(to: &w)
        case .reserved(let kind): w.int(UInt8(7)); w.string(kind)
        }
    }

    init(from r: inout BinaryReader) throws(ControlError) {
        let tag: UInt8 = try r.int("element tag")
        switch tag {
        case 1: self = .chan(capacity: try r.int("capacity"))
        case 2: self = .proc(try ProcState(from: &r))
        case 3: self = .select(clauses: try r.blob("clauses"))
        case 4:
            let raw: UInt8 = try r.int("subscription kind")
            guard let kind = SubscriptionKind(rawValue: raw) else { throw .malformedCommand("subscription kind \(raw)") }
            self = .subscription(kind)
        case 5: self = .record(try r.blob("value"))
        case 6: self = .job(try JobState(from: &r))
        case 7: self = .reserved(try r.string("reserved kind"))
        default: throw .malformedCommand("element tag \(tag)")
        }
    }
}

extension ProcState {
    func write(to w: inout BinaryWriter) {
        w.string(command.path); w.strings(command.args); w.strings(command.env); w.string(command.dir)
        w.int(phase.rawValue); w.int(pid); w.int(exitCode); w.int(signal); w.int(startedAt); w.int(endedAt); w.int(attempts)
    }

    init(from r: inout BinaryReader) throws(ControlError) {
        let command = ProcCommand(
            path: try r.string("command path"), args: try r.strings("args"), env: try r.strings("env"), dir: try r.string("dir"))
        let raw: UInt8 = try r.int("phase")
        guard let phase = ProcPhase(rawValue: raw) else { throw .malformedCommand("process phase \(raw)") }
        self.init(
            command: command, phase: phase, pid: try r.int("pid"), exitCode: try r.int("exit code"), signal: try r.int("signal"),
            startedAt: try r.int("start time"), endedAt: try r.int("end time"), attempts: try r.int("attempts"))
    }
}

extension JobState {
    func write(to w: inout BinaryWriter) {
        w.string(command.path); w.strings(command.args); w.strings(command.env); w.string(command.dir)
        w.int(maxAttempts); w.int(phase.rawValue); w.int(attempts); w.string(host); w.int(exitCode); w.int(signal)
    }

    init(from r: inout BinaryReader) throws(ControlError) {
        let command = ProcCommand(
            path: try r.string("command path"), args: try r.strings("args"), env: try r.strings("env"), dir: try r.string("dir"))
        let maxAttempts: UInt32 = try r.int("max attempts")
        let raw: UInt8 = try r.int("job phase")
        guard let phase = JobPhase(rawValue: raw) else { throw .malformedCommand("job phase \(raw)") }
        self.init(
            command: command, maxAttempts: maxAttempts, phase: phase, attempts: try r.int("attempts"), host: try r.string("host"),
            exitCode: try r.int("exit code"), signal: try r.int("signal"))
    }
}

// MARK: - Snapshots

extension ControlState {
    private static let snapshotMagic = Array("CIRCSTAT".utf8)
    private static let snapshotVersion: UInt32 = 1

    /// The whole state as bytes: equal states give equal bytes (everything is written in sorted order).
    public func snapshot() -> [UInt8] {
        var w = BinaryWriter()
        // Room for all of it at once (a 64-byte record's anchor takes about 160 bytes), not doublings of a large
        // array: one too few and the whole payload is copied into an array twice its size.
        w.bytes.reserveCapacity(history.encodedBytes + anchors.count * 256 + hosts.count * 128 + sessions.count * 64 + 4096)
        w.bytes.append(contentsOf: Self.snapshotMagic)
        w.int(Self.snapshotVersion)
        w.int(UInt64(historyLimit)); w.int(revision); w.int(appliedIndex); w.int(compactedThrough)
        w.int(UInt32(hosts.count))
        for h in hostList {
            w.string(h.id); w.string(h.peerAddress); w.string(h.clientAddress); w.int(h.role.rawValue); w.int(h.session)
            w.int(h.joinedAt); w.int(h.state.rawValue)
        }
        w.int(UInt32(sessions.count))
        for s in sessions.values.sorted(by: { $0.id < $1.id }) {
            w.int(s.id); w.int(s.ttlMillis); w.string(s.owner); w.int(s.createdAt)
        }
        w.int(UInt32(anchors.count))
        for path in anchors.sortedPaths {
            let a = anchors[path]!
            w.string(path); w.int(a.version); w.int(a.createRevision); w.int(a.modRevision); w.int(a.session)
            w.int(sequences[path] ?? 0); w.bool(a.element != nil)
            a.element?.write(to: &w)
        }
        history.write(to: &w)
        return w.bytes
    }

    /// A state restored from `snapshot()`'s bytes.
    public init(restoring bytes: [UInt8]) throws(ControlError) {
        guard bytes.count >= 12, Array(bytes[0..<8]) == Self.snapshotMagic else {
            throw .malformedCommand("not a control-state snapshot")
        }
        var r = BinaryReader(bytes)
        r.at = 8
        let version: UInt32 = try r.int("snapshot version")
        guard version == Self.snapshotVersion else { throw .malformedCommand("snapshot version \(version)") }
        self.init(historyLimit: Int(try r.int("history limit") as UInt64))
        revision = try r.int("revision")
        appliedIndex = try r.int("applied index")
        compactedThrough = try r.int("compacted revision")
        for _ in 0..<(try r.int("host count") as UInt32) {
            let id = try r.string("host id"), peer = try r.string("peer"), client = try r.string("client")
            let role = HostRole(rawValue: try r.int("role")) ?? .worker
            let session: SessionID = try r.int("session")
            let joined: Revision = try r.int("joined")
            let state = HostState(rawValue: try r.int("state")) ?? .left
            hosts[id] = Host(id: id, peerAddress: peer, clientAddress: client, role: role, session: session, joinedAt: joined, state: state)
        }
        for _ in 0..<(try r.int("session count") as UInt32) {
            let id: SessionID = try r.int("session id")
            sessions[id] = Session(id: id, ttlMillis: try r.int("ttl"), owner: try r.string("owner"), createdAt: try r.int("created"))
        }
        let anchorCount: UInt32 = try r.int("anchor count")
        // Grow the table once, not by doublings; a count larger than the bytes could hold is not believed.
        reserveAnchors(min(Int(anchorCount), (bytes.count - r.at) / 40))
        for _ in 0..<anchorCount {
            let path = try r.string("path")
            var a = Anchor(
                version: try r.int("version"), createRevision: try r.int("create revision"),
                modRevision: try r.int("mod revision"), session: try r.int("session"))
            let sequence: UInt64 = try r.int("sequence")
            if sequence > 0 { sequences[path] = sequence }
            if try r.bool("has element") { a.element = try Element(from: &r) }
            setAnchorRestoring(path, a)
        }
        for _ in 0..<(try r.int("event count") as UInt32) { retain(try WatchEvent(from: &r)) }
        guard r.isAtEnd else { throw .malformedCommand("\(bytes.count - r.at) bytes after the snapshot") }
    }
}

// MARK: - Results

extension CommandResult {
    private static let formatVersion: UInt8 = 1

    /// The bytes that carry a result from the replica that applied the command to whoever proposed it.
    public var encoded: [UInt8] {
        var w = BinaryWriter()
        w.int(Self.formatVersion)
        switch self {
        case .ok(let revision, let path, let version, let session):
            w.int(UInt8(1)); w.int(revision); w.bool(path != nil); w.string(path ?? ""); w.int(version); w.int(session)
        case .failed(let error):
            w.int(UInt8(2)); error.write(to: &w)
        }
        return w.bytes
    }

    public init(decoding bytes: [UInt8]) throws(ControlError) {
        var r = BinaryReader(bytes)
        let version: UInt8 = try r.int("result format version")
        guard version == Self.formatVersion else { throw .malformedCommand("result format version \(version)") }
        let tag: UInt8 = try r.int("result tag")
        switch tag {
        case 1:
            let revision: Revision = try r.int("revision")
            let hasPath = try r.bool("has path")
            let path = try r.string("path")
            self = .ok(revision: revision, path: hasPath ? path : nil, version: try r.int("version"), session: try r.int("session"))
        case 2:
            self = .failed(try ControlError(from: &r, depth: 0))
        default:
            throw .malformedCommand("result tag \(tag)")
        }
        guard r.isAtEnd else { throw .malformedCommand("\(bytes.count - r.at) bytes after the result") }
    }
}

extension ControlError {
    func write(to w: inout BinaryWriter) {
        switch self {
        case .invalidName(let path, let why): w.int(UInt8(1)); w.string(path); w.string(why)
        case .exists(let path, let kind): w.int(UInt8(2)); w.string(path); w.string(kind)
        case .notFound(let path): w.int(UInt8(3)); w.string(path)
        case .versionMismatch(let path, let expected, let actual):
            w.int(UInt8(4)); w.string(path); w.int(expected); w.int(actual)
        case .wrongKind(let path, let expected, let actual):
            w.int(UInt8(5)); w.string(path); w.string(expected); w.string(actual)
        case .noSuchSession(let id): w.int(UInt8(6)); w.int(id)
        case .noSuchHost(let id): w.int(UInt8(7)); w.string(id)
        case .hostNotAlive(let id): w.int(UInt8(8)); w.string(id)
        case .transactionFailed(let index, let error): w.int(UInt8(9)); w.int(UInt32(index)); error.write(to: &w)
        case .malformedCommand(let why): w.int(UInt8(10)); w.string(why)
        case .tooManySessions(let owner, let limit): w.int(UInt8(11)); w.string(owner); w.int(limit)
        }
    }

    init(from r: inout BinaryReader, depth: Int) throws(ControlError) {
        let tag: UInt8 = try r.int("error tag")
        switch tag {
        case 1: self = .invalidName(path: try r.string("path"), why: try r.string("why"))
        case 2: self = .exists(path: try r.string("path"), kind: try r.string("kind"))
        case 3: self = .notFound(path: try r.string("path"))
        case 4: self = .versionMismatch(path: try r.string("path"), expected: try r.int("expected"), actual: try r.int("actual"))
        case 5: self = .wrongKind(path: try r.string("path"), expected: try r.string("expected"), actual: try r.string("actual"))
        case 6: self = .noSuchSession(try r.int("session"))
        case 7: self = .noSuchHost(try r.string("host"))
        case 8: self = .hostNotAlive(try r.string("host"))
        case 9:
            // A transaction's failure wraps its operation's, which is never itself a transaction's.
            guard depth == 0 else { throw .malformedCommand("nested transaction failure") }
            let index: UInt32 = try r.int("operation index")
            self = .transactionFailed(index: Int(index), try ControlError(from: &r, depth: depth + 1))
        case 10: self = .malformedCommand(try r.string("why"))
        case 11: self = .tooManySessions(owner: try r.string("owner"), limit: try r.int("limit"))
        default: throw .malformedCommand("error tag \(tag)")
        }
    }
}
