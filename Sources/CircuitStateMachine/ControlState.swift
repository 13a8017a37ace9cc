/// The replicated control state: hosts, sessions, the namespace of anchors and elements, global records, and the
/// history of changes that watches read.
///
/// A deterministic value type: `apply` takes a command and the Raft index of its entry and nothing else — no clock,
/// no randomness, no dictionary order leaks into results, events or snapshots — so every replica that applies the
/// same log holds byte-identical state.
public struct ControlState: Sendable {
    public internal(set) var revision: Revision = 0
    /// The Raft index of the last command applied.
    public internal(set) var appliedIndex: UInt64 = 0
    public internal(set) var anchors = AnchorTable()
    /// Parent path → names of its child anchors.
    private var children: [String: Set<String>] = [:]
    public internal(set) var hosts: [String: Host] = [:]
    public internal(set) var sessions: [SessionID: Session] = [:]
    /// Session → paths of the ephemeral elements tied to it.
    private var ephemerals: [SessionID: Set<String>] = [:]
    /// The retained changes, oldest first.
    private(set) var history: WatchHistory
    /// Events up to this revision are no longer retained.
    public internal(set) var compactedThrough: Revision = 0
    /// How many events to retain for watches that resume from a revision.
    public var historyLimit: Int { history.limit }
    /// Inside a transaction: the first previous value of every anchor touched, to roll back.
    private var journal: [(AnchorTable.Key, Anchor?)]?
    /// Parent path → the next suffix for a sequential child, for the parents that have had one.
    var sequences: [String: UInt64] = [:]
    /// Inside a transaction: the first previous counter of every parent that issued a sequential name.
    private var sequenceJournal: [(String, UInt64?)] = []
    private var pending: [WatchEvent] = []

    public init(historyLimit: Int = 100_000) {
        self.history = WatchHistory(limit: historyLimit)
    }

    /// The outcome of one command: its result and the changes it made, in order.
    public struct Outcome: Sendable, Hashable {
        public var result: CommandResult
        public var events: [WatchEvent]
    }

    // MARK: - Applying

    public mutating func apply(_ command: Command, index: UInt64) -> Outcome {
        appliedIndex = index
        pending.removeAll(keepingCapacity: true)
        let result: CommandResult
        switch command {
        case .transaction(let ops):
            result = applyTransaction(ops)
        default:
            let before = revision
            revision += 1
            switch applyOne(command, index: index) {
            case .success(let r):
                if pending.isEmpty { revision = before }  // nothing changed: no revision spent
                result = r.withRevision(revision)
            case .failure(let e):
                revision = before
                result = .failed(e)
            }
        }
        let events = pending
        record(events)
        return Outcome(result: result, events: events)
    }

    private mutating func applyTransaction(_ ops: [TransactionOp]) -> CommandResult {
        let before = revision
        revision += 1
        journal = []
        sequenceJournal.removeAll()
        var last: CommandResult = .ok(revision: revision, path: nil, version: 0, session: 0)
        for (i, op) in ops.enumerated() {
            let outcome: Result<CommandResult, ControlError>
            switch op {
            case .check(let path, let version):
                let actual = anchors[path]?.version ?? 0
                outcome = actual == version ? .success(last) : .failure(.versionMismatch(path: path, expected: version, actual: actual))
            case .create(let path, let element, let session, let sequential):
                outcome = create(path, element, session: session, sequential: sequential)
            case .put(let path, let value, let session):
                outcome = put(path, value, session: session)
            case .delete(let path, let version):
                outcome = delete(path, version: version)
            }
            switch outcome {
            case .success(let r):
                last = r
            case .failure(let e):
                // Roll back, newest first.
                let undo = journal!
                journal = nil
                for (parent, old) in sequenceJournal.reversed() { sequences[parent] = old }
                for (key, old) in undo.reversed() { setAnchor(key, old, previous: anchors[key]) }
                revision = before
                pending.removeAll()
                return .failed(.transactionFailed(index: i, e))
            }
        }
        journal = nil
        if pending.isEmpty { revision = before }
        return last.withRevision(revision)
    }

    private mutating func applyOne(_ command: Command, index: UInt64) -> Result<CommandResult, ControlError> {
        switch command {
        case .registerHost(let id, let peer, let client, let role, let ttl):
            return registerHost(id, peer: peer, client: client, role: role, ttl: ttl, index: index)
        case .leaveHost(let id):
            guard let host = hosts[id] else { return .failure(.noSuchHost(id)) }
            guard host.state == .alive else { return .failure(.hostNotAlive(id)) }
            endSession(host.session, hostState: .left)
            return .success(.ok(revision: 0, path: nil, version: 0, session: 0))
        case .grantSession(let owner, let ttl, let limit):
            // A scan: grants are rare next to reads, and a count kept beside the sessions would be one more thing
            // for a snapshot to restore.
            if limit > 0, sessions.values.lazy.filter({ $0.owner == owner }).count >= Int(limit) {
                return .failure(.tooManySessions(owner: owner, limit: limit))
            }
            sessions[index] = Session(id: index, ttlMillis: ttl, owner: owner, createdAt: revision)
            return .success(.ok(revision: 0, path: nil, version: 0, session: index))
        case .endSession(let id, let expired):
            guard sessions[id] != nil else { return .failure(.noSuchSession(id)) }
            endSession(id, hostState: expired ? .expired : .left)
            return .success(.ok(revision: 0, path: nil, version: 0, session: id))
        case .create(let path, let element, let session, let sequential):
            return create(path, element, session: session, sequential: sequential)
        case .put(let path, let value, let session):
            return put(path, value, session: session)
        case .compareAndSet(let path, let version, let value):
            let actual = anchors[path]?.version ?? 0
            guard actual == version else { return .failure(.versionMismatch(path: path, expected: version, actual: actual)) }
            return put(path, value, session: anchors[path]?.session ?? 0)
        case .delete(let path, let version):
            return delete(path, version: version)
        case .updateProc(let path, let state):
            // A dead host's processes are lost for good: a late report from it changes nothing.
            if let host = Names.host(of: path), hosts[host]?.state != .alive { return .failure(.hostNotAlive(host)) }
            return replace(path, with: .proc(state))
        case .updateJob(let path, let state):
            return replace(path, with: .job(state))
        case .setHostRole(let id, let role):
            guard var host = hosts[id] else { return .failure(.noSuchHost(id)) }
            guard host.state == .alive else { return .failure(.hostNotAlive(id)) }
            guard host.role != role else { return .success(.ok(revision: 0, path: "/" + id, version: 0, session: host.session)) }
            host.role = role
            hosts[id] = host
            pending.append(WatchEvent(revision: revision, kind: .hostUpdated, path: "/" + id, version: 0, element: nil))
            return .success(.ok(revision: 0, path: "/" + id, version: 0, session: host.session))
        case .transaction:
            preconditionFailure("transactions are applied by applyTransaction")
        }
    }

    private mutating func registerHost(
        _ id: String, peer: String, client: String, role: HostRole, ttl: UInt64, index: UInt64
    ) -> Result<CommandResult, ControlError> {
        guard Names.isHostID(id) else {
            return .failure(.invalidName(path: id, why: "a host id is X followed by 16 lowercase hex digits"))
        }
        if let old = hosts[id], old.state == .alive {
            // A restarted daemon rejoins: its old session's ephemerals go, its subtree stays (it reconciles it).
            dropSessionEphemerals(old.session)
            sessions[old.session] = nil
        }
        sessions[index] = Session(id: index, ttlMillis: ttl, owner: id, createdAt: revision)
        hosts[id] = Host(
            id: id, peerAddress: peer, clientAddress: client, role: role, session: index, joinedAt: revision, state: .alive)
        pending.append(WatchEvent(revision: revision, kind: .hostJoined, path: "/" + id, version: 0, element: nil))
        return .success(.ok(revision: 0, path: "/" + id, version: 0, session: index))
    }

    /// Ends a session: its ephemerals go; a host that owned it is no longer alive and its subtree goes.
    private mutating func endSession(_ id: SessionID, hostState: HostState) {
        dropSessionEphemerals(id)
        if let session = sessions.removeValue(forKey: id), var host = hosts[session.owner], host.session == id,
            host.state == .alive
        {
            host.state = hostState
            hosts[host.id] = host
            // A host that left on its own stopped its processes: its subtree goes. A host that died leaves its
            // processes `lost` (their last state kept, for whoever waits on them) and the rest of its subtree goes.
            for path in descendants(of: "/" + host.id).reversed() {
                if hostState == .expired, case .proc(var p)? = anchors[path]?.element {
                    if p.phase == .pending || p.phase == .running {
                        p.phase = .lost
                        _ = replace(path, with: .proc(p))
                    }
                    continue
                }
                removeElement(path)
            }
            pending.append(WatchEvent(revision: revision, kind: .hostLeft, path: "/" + host.id, version: 0, element: nil))
        }
    }

    private mutating func dropSessionEphemerals(_ id: SessionID) {
        for path in (ephemerals[id] ?? []).sorted().reversed() { removeElement(path) }
    }

    private mutating func create(
        _ path: String, _ element: Element, session: SessionID, sequential: Bool
    ) -> Result<CommandResult, ControlError> {
        if let error = checkPlacement(path, element: element, session: session) { return .failure(error) }
        var target = path
        if sequential {
            let parent = Names.parent(of: path)
            ensureAncestors(of: path)
            let old = sequences[parent]
            let suffix = String(old ?? 0)
            target = path + String(repeating: "0", count: max(0, 10 - suffix.count)) + suffix
            if let error = Names.validate(target) { return .failure(error) }
            if journal != nil, !sequenceJournal.contains(where: { $0.0 == parent }) { sequenceJournal.append((parent, old)) }
            sequences[parent] = (old ?? 0) + 1
        }
        let key = AnchorTable.Key(target)
        let previous = anchors[key]
        if let existing = previous?.element {
            // A reservation for this kind is made into the element; anything else at the name is in the way.
            guard case .reserved(let kind) = existing, kind == element.kind else {
                return .failure(.exists(path: target, kind: existing.kind))
            }
        }
        if previous == nil { ensureAncestors(of: target) }  // an existing anchor has its ancestors
        var anchor = previous ?? Anchor()
        anchor.element = element
        anchor.version = 1
        anchor.createRevision = revision
        anchor.modRevision = revision
        anchor.session = session
        setAnchor(key, anchor, previous: previous)
        emit(.put, target, anchor)
        return .success(.ok(revision: 0, path: target, version: 1, session: session))
    }

    /// A new state of the element at `path`, of the same kind (a process's or a job's report).
    private mutating func replace(_ path: String, with new: Element) -> Result<CommandResult, ControlError> {
        let key = AnchorTable.Key(path)
        guard let previous = anchors[key], let element = previous.element else { return .failure(.notFound(path: path)) }
        guard element.kind == new.kind else { return .failure(.wrongKind(path: path, expected: new.kind, actual: element.kind)) }
        var anchor = previous
        anchor.element = new
        anchor.version += 1
        anchor.modRevision = revision
        setAnchor(key, anchor, previous: previous)
        emit(.put, path, anchor)
        return .success(.ok(revision: 0, path: path, version: anchor.version, session: anchor.session))
    }

    private mutating func put(_ path: String, _ value: [UInt8], session: SessionID) -> Result<CommandResult, ControlError> {
        let key = AnchorTable.Key(path)
        guard let previous = anchors[key], let element = previous.element else {
            return create(path, .record(value), session: session, sequential: false)
        }
        guard case .record = element else { return .failure(.wrongKind(path: path, expected: "record", actual: element.kind)) }
        if session != previous.session, session != 0, sessions[session] == nil { return .failure(.noSuchSession(session)) }
        var anchor = previous
        anchor.element = .record(value)
        anchor.version += 1
        anchor.modRevision = revision
        anchor.session = session
        setAnchor(key, anchor, previous: previous)
        emit(.put, path, anchor)
        return .success(.ok(revision: 0, path: path, version: anchor.version, session: session))
    }

    private mutating func delete(_ path: String, version: UInt64?) -> Result<CommandResult, ControlError> {
        guard let anchor = anchors[path], anchor.element != nil else { return .failure(.notFound(path: path)) }
        if let version, version != anchor.version {
            return .failure(.versionMismatch(path: path, expected: version, actual: anchor.version))
        }
        removeElement(path)
        return .success(.ok(revision: 0, path: path, version: 0, session: 0))
    }

    /// Where an element may go: a valid name, under a live host or the records root (records only there), with a
    /// live session if ephemeral.
    private func checkPlacement(_ path: String, element: Element, session: SessionID) -> ControlError? {
        if let error = Names.validate(path) { return error }
        if case .reserved(let kind) = element {
            guard Element.reservable.contains(kind) else {
                return .wrongKind(path: path, expected: "a reservation for proc, chan or select", actual: kind)
            }
            guard Names.host(of: path) != nil else { return .invalidName(path: path, why: "a reservation lives under a host") }
        }
        if case .job = element, !Names.isJob(path) {
            return .invalidName(path: path, why: "a job lives under \(Names.jobsRoot)")
        }
        if let host = Names.host(of: path) {
            guard let h = hosts[host] else { return .noSuchHost(host) }
            guard h.state == .alive else { return .hostNotAlive(host) }
        } else if Names.isJob(path) {
            guard case .job = element else {
                return .wrongKind(path: path, expected: "job: only jobs live under \(Names.jobsRoot)", actual: element.kind)
            }
        } else if case .record = element {
        } else {
            return .wrongKind(path: path, expected: "record: only records live under \(Names.recordsRoot)", actual: element.kind)
        }
        if session != 0 && sessions[session] == nil { return .noSuchSession(session) }
        return nil
    }

    // MARK: - The tree

    private mutating func removeElement(_ path: String) {
        let key = AnchorTable.Key(path)
        guard let previous = anchors[key], previous.element != nil else { return }
        var anchor = previous
        anchor.element = nil
        anchor.version = 0
        anchor.session = 0
        anchor.modRevision = revision
        setAnchor(key, anchor, previous: previous)
        pending.append(WatchEvent(revision: revision, kind: .delete, path: path, version: 0, element: nil))
        prune(path)
    }

    /// Removes anchors that hold nothing, from `path` up.
    private mutating func prune(_ path: String) {
        var p = path
        while p != "/", case let key = AnchorTable.Key(p), let a = anchors[key], a.element == nil,
            children[p]?.isEmpty ?? true, sequences[p] == nil
        {
            setAnchor(key, nil, previous: a)
            p = Names.parent(of: p)
        }
    }

    private mutating func ensureAncestors(of path: String) {
        var p = Names.parent(of: path)
        // A parent that has children is an anchor, and so are its ancestors: one lookup in the small children index
        // (one entry per parent) instead of the anchors (one per name) in the common case.
        if p == "/" || children[p] != nil { return }
        var missing: [String] = []
        while p != "/" && anchors[p] == nil {
            missing.append(p)
            p = Names.parent(of: p)
        }
        for a in missing.reversed() {
            setAnchor(AnchorTable.Key(a), Anchor(createRevision: revision, modRevision: revision), previous: nil)
        }
    }

    /// The one place anchors change: keeps the children and ephemeral indexes, and the transaction journal.
    /// `previous` is the anchor the caller has just read at `key`.
    private mutating func setAnchor(_ key: AnchorTable.Key, _ new: Anchor?, previous old: Anchor?) {
        let path = key.path
        if journal != nil, !journal!.contains(where: { $0.0 == key }) { journal!.append((key, old)) }
        if let oldSession = old?.session, oldSession != 0, oldSession != new?.session {
            ephemerals[oldSession]?.remove(path)
            if ephemerals[oldSession]?.isEmpty == true { ephemerals[oldSession] = nil }
        }
        if let s = new?.session, s != 0, s != old?.session { ephemerals[s, default: []].insert(path) }
        if (old == nil) != (new == nil) {
            // Only a new or removed anchor changes its parent's children.
            let slash = path.utf8.lastIndex(of: UInt8(ascii: "/"))!
            let parent = slash == path.startIndex ? "/" : String(path[..<slash])
            let name = String(path[path.index(after: slash)...])
            if new != nil {
                children[parent, default: []].insert(name)
            } else {
                children[parent]?.remove(name)
                if children[parent]?.isEmpty == true { children[parent] = nil }
            }
        }
        anchors[key] = new
    }

    private mutating func emit(_ kind: WatchEvent.Kind, _ path: String, _ anchor: Anchor) {
        pending.append(WatchEvent(revision: revision, kind: kind, path: path, version: anchor.version, element: anchor.element))
    }

    private mutating func record(_ events: [WatchEvent]) {
        for event in events { retain(event) }
    }

    // MARK: - Reading

    /// The suffix the next sequential name created under `path` will get.
    public func nextSequence(under path: String) -> UInt64 { sequences[path] ?? 0 }

    /// The names of `path`'s child anchors, sorted.
    public func children(of path: String) -> [String] {
        (children[path] ?? []).sorted()
    }

    /// Every path below `path` that holds an element, sorted.
    public func descendants(of path: String) -> [String] {
        var out: [String] = []
        var stack = [path]
        while let p = stack.popLast() {
            for name in children[p] ?? [] {
                let child = p == "/" ? "/" + name : p + "/" + name
                if anchors[child]?.element != nil { out.append(child) }
                stack.append(child)
            }
        }
        return out.sorted()
    }

    /// The hosts, sorted by id.
    public var hostList: [Host] { hosts.values.sorted { $0.id < $1.id } }

    /// Every retained change after `revision` under `prefix` (the path itself, or anything below it), in order; or
    /// `compacted` if changes after `revision` are no longer retained.
    public func events(after revision: Revision, prefix: String = "/") -> Result<[WatchEvent], WatchError> {
        if revision < compactedThrough { return .failure(.compacted(resumeFrom: compactedThrough + 1)) }
        let scope = PathPrefix(prefix)
        return .success(history.events(after: revision, matching: scope.covers))
    }

    mutating func setAnchorRestoring(_ path: String, _ anchor: Anchor) {
        let key = AnchorTable.Key(path)
        setAnchor(key, anchor, previous: anchors[key])
    }
    mutating func reserveAnchors(_ n: Int) { anchors.reserveCapacity(n) }
    /// Adds `event` to the history, which drops its oldest chunks to stay near its limit (never splitting a
    /// revision: a watcher resumes at a revision boundary).
    mutating func retain(_ event: WatchEvent) {
        if let dropped = history.append(event) { compactedThrough = dropped }
    }

    /// The retained history's first revision (after `compactedThrough`).
    public var retainedFrom: Revision { compactedThrough + 1 }
}

public enum WatchError: Error, Sendable, Hashable, CustomStringConvertible {
    /// Changes after the requested revision were dropped from the history: read the current state, then watch
    /// from `resumeFrom`.
    case compacted(resumeFrom: Revision)
    public var description: String {
        switch self {
        case .compacted(let r): return "compacted: the history starts after that revision; resume from revision \(r)"
        }
    }
}

extension CommandResult {
    func withRevision(_ revision: Revision) -> CommandResult {
        guard case .ok(_, let path, let version, let session) = self else { return self }
        return .ok(revision: revision, path: path, version: version, session: session)
    }
}

/// What a watch of `prefix` covers: the path itself and everything below it ("/a" covers "/a" and "/a/b", not "/ab";
/// "/" covers every path). What a path below begins with is put together once: this is asked for every change
/// applied, of every watcher.
public struct PathPrefix: Sendable, Hashable {
    public let prefix: String
    /// "/a/b/" for "/a/b" (or "/a/b/"); nil for "/".
    private let below: String?

    public init(_ prefix: String) {
        self.prefix = prefix
        self.below = prefix == "/" ? nil : prefix.hasSuffix("/") ? prefix : prefix + "/"
    }

    public func covers(_ path: String) -> Bool {
        guard let below else { return true }
        return path == prefix || path.hasPrefix(below)
    }
}
