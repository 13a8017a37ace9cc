import Testing

@testable import CircuitStateMachine

let hostA = "X00000000000000aa"
let hostB = "X00000000000000bb"

extension ControlState {
    /// Applies commands at consecutive indexes after the current one; returns the results.
    @discardableResult
    mutating func run(_ commands: Command...) -> [CommandResult] {
        commands.map { apply($0, index: appliedIndex + 1).result }
    }
}

func ok(_ r: CommandResult) -> Bool {
    if case .ok = r { return true }
    return false
}

func failure(_ r: CommandResult) -> ControlError? {
    if case .failed(let e) = r { return e }
    return nil
}

@Suite("Control state: operations")
struct OperationTests {
    @Test(
        "names follow the rules, and a bad one is refused naming why",
        arguments: [
            ("/records/a/b-1.x_y", nil),
            ("/\(hostA)/proc/job", nil),
            ("records/a", "must start with /"),
            ("/records", "must name something below a host, /records or /jobs"),
            ("/records//a", "has an empty segment"),
            ("/records/a/../b", "has a . or .. segment"),
            ("/records/a b", "has the character \" \"; allowed: letters, digits, . _ -"),
            ("/elsewhere/a", "must start with a host (X and 16 hex digits), /records or /jobs"),
            ("/XABC/a", "must start with a host (X and 16 hex digits), /records or /jobs"),
            ("/records/" + String(repeating: "a", count: 129), "has a segment longer than 128 bytes"),
        ] as [(String, String?)])
    func nameRules(path: String, why: String?) {
        let error = Names.validate(path)
        if let why {
            #expect(error == .invalidName(path: path, why: why))
        } else {
            #expect(error == nil)
        }
    }

    @Test("create, get, put, compare-and-set and delete a record, each raising the revision once")
    func recordLifecycle() {
        var s = ControlState()
        let r = s.run(
            .create(path: "/records/cfg", element: .record([1]), session: 0, sequential: false),
            .put(path: "/records/cfg", value: [2], session: 0),
            .compareAndSet(path: "/records/cfg", version: 2, value: [3]),
            .compareAndSet(path: "/records/cfg", version: 2, value: [4]),
            .delete(path: "/records/cfg", version: 9),
            .delete(path: "/records/cfg", version: 3))
        #expect(r[0] == .ok(revision: 1, path: "/records/cfg", version: 1, session: 0))
        #expect(r[1] == .ok(revision: 2, path: "/records/cfg", version: 2, session: 0))
        #expect(r[2] == .ok(revision: 3, path: "/records/cfg", version: 3, session: 0))
        #expect(failure(r[3]) == .versionMismatch(path: "/records/cfg", expected: 2, actual: 3))
        #expect(failure(r[4]) == .versionMismatch(path: "/records/cfg", expected: 9, actual: 3))
        #expect(r[5] == .ok(revision: 4, path: "/records/cfg", version: 0, session: 0))
        #expect(s.anchors["/records/cfg"] == nil, "an empty anchor is pruned")
        #expect(s.revision == 4)
    }

    @Test("creating where an element exists names the existing kind; CAS at version 0 creates only if absent")
    func existingElement() {
        var s = ControlState()
        s.run(.registerHost(id: hostA, peerAddress: "p", clientAddress: "c", role: .voter, ttlMillis: 5000))
        let r = s.run(
            .create(path: "/\(hostA)/c", element: .chan(capacity: 3), session: 0, sequential: false),
            .create(path: "/\(hostA)/c", element: .record([]), session: 0, sequential: false),
            .put(path: "/\(hostA)/c", value: [1], session: 0),
            .compareAndSet(path: "/records/new", version: 0, value: [1]),
            .compareAndSet(path: "/records/new", version: 0, value: [2]))
        #expect(ok(r[0]))
        #expect(failure(r[1]) == .exists(path: "/\(hostA)/c", kind: "chan"))
        #expect(failure(r[2]) == .wrongKind(path: "/\(hostA)/c", expected: "record", actual: "chan"))
        #expect(ok(r[3]))
        #expect(failure(r[4]) == .versionMismatch(path: "/records/new", expected: 0, actual: 1))
    }

    @Test("a name reserved for a kind is made into that kind's element and nothing else; reservations live under hosts")
    func reservations() {
        var s = ControlState()
        s.run(.registerHost(id: hostA, peerAddress: "p", clientAddress: "c", role: .voter, ttlMillis: 5000))
        let r = s.run(
            .create(path: "/\(hostA)/c", element: .reserved("chan"), session: 0, sequential: false),
            .create(path: "/\(hostA)/c", element: .reserved("chan"), session: 0, sequential: false),
            .create(path: "/\(hostA)/c", element: .select(clauses: []), session: 0, sequential: false),
            .create(path: "/\(hostA)/c", element: .chan(capacity: 2), session: 0, sequential: false),
            .create(path: "/\(hostA)/c", element: .chan(capacity: 2), session: 0, sequential: false),
            .create(path: "/\(hostA)/r", element: .reserved("record"), session: 0, sequential: false),
            .create(path: "/records/x", element: .reserved("chan"), session: 0, sequential: false))
        #expect(ok(r[0]))
        #expect(failure(r[1]) == .exists(path: "/\(hostA)/c", kind: "reserved"))
        #expect(failure(r[2]) == .exists(path: "/\(hostA)/c", kind: "reserved"))  // reserved for a chan, not a select
        #expect(ok(r[3]))
        #expect(s.anchors["/\(hostA)/c"]?.element == .chan(capacity: 2))
        #expect(s.anchors["/\(hostA)/c"]?.version == 1)
        #expect(failure(r[4]) == .exists(path: "/\(hostA)/c", kind: "chan"))
        #expect(failure(r[5]) == .wrongKind(path: "/\(hostA)/r", expected: "a reservation for proc, chan or select", actual: "record"))
        #expect(failure(r[6]) == .invalidName(path: "/records/x", why: "a reservation lives under a host"))
        // A reservation goes with its host, as channels do.
        s.run(.create(path: "/\(hostA)/p", element: .reserved("proc"), session: 0, sequential: false))
        s.run(.leaveHost(id: hostA))
        #expect(s.anchors["/\(hostA)/p"]?.element == nil)
    }

    @Test("elements live under a live host; only records live under /records")
    func placement() {
        var s = ControlState()
        let r = s.run(
            .create(path: "/\(hostA)/p", element: .chan(capacity: 0), session: 0, sequential: false),
            .create(path: "/records/p", element: .chan(capacity: 0), session: 0, sequential: false),
            .create(path: "/records/e", element: .record([]), session: 77, sequential: false))
        #expect(failure(r[0]) == .noSuchHost(hostA))
        #expect(failure(r[1]) == .wrongKind(path: "/records/p", expected: "record: only records live under /records", actual: "chan"))
        #expect(failure(r[2]) == .noSuchSession(77))
    }

    @Test("sequential names take a per-parent counter, for queues and locks")
    func sequential() {
        var s = ControlState()
        let r = s.run(
            .create(path: "/records/q/item-", element: .record([1]), session: 0, sequential: true),
            .create(path: "/records/q/item-", element: .record([2]), session: 0, sequential: true),
            .create(path: "/records/other/x-", element: .record([3]), session: 0, sequential: true))
        let paths: [String?] = r.map { if case .ok(_, let p, _, _) = $0 { return p } else { return nil } }
        #expect(paths == ["/records/q/item-0000000000", "/records/q/item-0000000001", "/records/other/x-0000000000"])
        #expect(s.children(of: "/records/q") == ["item-0000000000", "item-0000000001"])

        // A failed transaction takes back the number it drew; the parent keeps counting once its children are gone.
        let seq = TransactionOp.create(path: "/records/q/item-", element: .record([]), session: 0, sequential: true)
        let bad = s.run(.transaction([seq, .check(path: "/records/none", version: 5)]))[0]
        #expect(failure(bad) != nil)
        #expect(s.nextSequence(under: "/records/q") == 2)
        let fresh = s.run(.transaction([.create(path: "/records/new/j-", element: .record([]), session: 0, sequential: true),
                                        .check(path: "/records/none", version: 5)]))[0]
        #expect(failure(fresh) != nil)
        #expect(s.nextSequence(under: "/records/new") == 0 && s.anchors["/records/new"] == nil)
        s.run(.delete(path: "/records/q/item-0000000000", version: nil), .delete(path: "/records/q/item-0000000001", version: nil))
        #expect(s.anchors["/records/q"] != nil, "a parent that issued sequential names stays, with its counter")
        let next = s.run(.create(path: "/records/q/item-", element: .record([]), session: 0, sequential: true))[0]
        #expect(next == .ok(revision: s.revision, path: "/records/q/item-0000000002", version: 1, session: 0))
        let restored = try? ControlState(restoring: s.snapshot())
        #expect(restored?.nextSequence(under: "/records/q") == 3, "the counter is in the snapshot")
    }

    @Test("jobs live under /jobs and only there; the leader records their placements; they survive a snapshot")
    func jobs() throws {
        var s = ControlState()
        s.run(.registerHost(id: hostA, peerAddress: "p", clientAddress: "c", role: .voter, ttlMillis: 1000))
        let spec = JobState(command: ProcCommand(path: "/bin/true"), maxAttempts: 2)
        let r = s.run(
            .create(path: "/jobs/build", element: .job(spec), session: 0, sequential: false),
            .create(path: "/\(hostA)/j", element: .job(spec), session: 0, sequential: false),
            .create(path: "/jobs/rec", element: .record([]), session: 0, sequential: false),
            .updateJob(path: "/jobs/build", state: JobState(command: spec.command, maxAttempts: 2, phase: .placed, attempts: 1, host: hostA)),
            .updateJob(path: "/jobs/none", state: spec))
        #expect(ok(r[0]))
        #expect(failure(r[1]) == .invalidName(path: "/\(hostA)/j", why: "a job lives under /jobs"))
        #expect(failure(r[2]) == .wrongKind(path: "/jobs/rec", expected: "job: only jobs live under /jobs", actual: "record"))
        #expect(ok(r[3]) && failure(r[4]) == .notFound(path: "/jobs/none"))
        guard case .job(let placed)? = s.anchors["/jobs/build"]?.element else { Issue.record("no job"); return }
        #expect(placed.phase == .placed && placed.host == hostA && placed.attempts == 1)
        let restored = try ControlState(restoring: s.snapshot())
        #expect(restored.anchors["/jobs/build"] == s.anchors["/jobs/build"])
        let bytes = Command.updateJob(path: "/jobs/build", state: placed).encoded
        #expect(try Command(decoding: bytes) == .updateJob(path: "/jobs/build", state: placed))
    }

    @Test("listing: children and recursive, sorted")
    func listing() {
        var s = ControlState()
        for p in ["/records/b", "/records/a/x", "/records/a/y/z", "/records/a"] {
            s.run(.put(path: p, value: [], session: 0))
        }
        #expect(s.children(of: "/records") == ["a", "b"])
        #expect(s.children(of: "/records/a") == ["x", "y"])
        #expect(s.descendants(of: "/records/a") == ["/records/a/x", "/records/a/y/z"])
        #expect(s.anchors["/records/a/y"]?.element == nil, "an implicit anchor holds no element")
    }

    @Test("a transaction applies all or nothing, as one revision")
    func transactions() {
        var s = ControlState()
        s.run(.put(path: "/records/a", value: [1], session: 0))
        let good = s.run(
            .transaction([
                .check(path: "/records/a", version: 1), .put(path: "/records/a", value: [2], session: 0),
                .create(path: "/records/b", element: .record([]), session: 0, sequential: false),
            ]))[0]
        #expect(good == .ok(revision: 2, path: "/records/b", version: 1, session: 0))
        let bad = s.run(
            .transaction([
                .put(path: "/records/a", value: [3], session: 0), .delete(path: "/records/b", version: nil),
                .create(path: "/records/c/d", element: .record([]), session: 0, sequential: false),
                .check(path: "/records/a", version: 99),
            ]))[0]
        #expect(failure(bad) == .transactionFailed(index: 3, .versionMismatch(path: "/records/a", expected: 99, actual: 3)))
        #expect(s.anchors["/records/a"]?.version == 2)
        #expect(s.anchors["/records/b"]?.element != nil)
        #expect(s.anchors["/records/c"] == nil && s.anchors["/records/c/d"] == nil)
        #expect(s.revision == 2)
        let after = try? s.events(after: 2).get()
        #expect(after == [], "a failed transaction leaves no event")
    }

    @Test("a grant with a limit is refused while its owner holds that many sessions; other owners, hosts and grants without one are not counted against it")
    func sessionLimit() throws {
        var s = ControlState()
        s.run(.registerHost(id: hostA, peerAddress: "p", clientAddress: "c", role: .worker, ttlMillis: 3000))
        let granted = s.run(
            .grantSession(owner: "alice", ttlMillis: 1000, limit: 2), .grantSession(owner: "alice", ttlMillis: 1000, limit: 2),
            .grantSession(owner: "bob", ttlMillis: 1000, limit: 2))
        #expect(granted.allSatisfy { if case .ok = $0 { true } else { false } })
        let third = s.run(.grantSession(owner: "alice", ttlMillis: 1000, limit: 2))[0]
        #expect(failure(third) == .tooManySessions(owner: "alice", limit: 2))
        #expect(s.sessions.values.filter { $0.owner == "alice" }.count == 2, "the refused grant made no session")
        // Without a limit (a grant from before limits, or from a member) it is granted; a higher limit lets it pass.
        guard case .ok(_, _, _, let unlimited) = s.run(.grantSession(owner: "alice", ttlMillis: 1000))[0] else {
            Issue.record("a grant without a limit was refused"); return
        }
        #expect(failure(s.run(.grantSession(owner: "alice", ttlMillis: 1000, limit: 3))[0]) == .tooManySessions(owner: "alice", limit: 3))
        // An ended session makes room.
        s.run(.endSession(id: unlimited, expired: false))
        if case .failed(let e) = s.run(.grantSession(owner: "alice", ttlMillis: 1000, limit: 3))[0] { Issue.record("refused: \(e)") }
        // On the wire: a grant without a limit keeps its old bytes; one with a limit round-trips.
        let old = Command.grantSession(owner: "alice", ttlMillis: 1000)
        #expect(old.encoded == [1, 3, 0, 0, 0, 5] + Array("alice".utf8) + [0, 0, 0, 0, 0, 0, 3, 232])
        let limited = Command.grantSession(owner: "alice", ttlMillis: 1000, limit: 7)
        #expect(try Command(decoding: limited.encoded) == limited)
        #expect(throws: ControlError.self) { try Command(decoding: limited.encoded + [0]) }
    }

    @Test("a session's end removes its ephemerals in the same change; a host's end removes its subtree")
    func sessionsAndHosts() {
        var s = ControlState()
        s.run(.registerHost(id: hostA, peerAddress: "p", clientAddress: "c", role: .worker, ttlMillis: 3000))
        let hostSession = s.hosts[hostA]!.session
        let grant = s.run(.grantSession(owner: "client-1", ttlMillis: 1000))[0]
        guard case .ok(_, _, _, let session) = grant else { Issue.record("no session"); return }
        s.run(
            .put(path: "/records/svc/web-1", value: Array("10.0.0.1:80".utf8), session: session),
            .put(path: "/records/svc/durable", value: [], session: 0),
            .create(path: "/\(hostA)/job", element: .proc(ProcState(command: ProcCommand(path: "/bin/true"))), session: 0, sequential: false))
        let before = s.revision
        let end = s.apply(.endSession(id: session, expired: true), index: s.appliedIndex + 1)
        #expect(end.events.map(\.path) == ["/records/svc/web-1"])
        #expect(end.events.allSatisfy { $0.revision == before + 1 })
        #expect(s.anchors["/records/svc/durable"] != nil)
        s.run(.create(path: "/\(hostA)/chan", element: .chan(capacity: 1), session: 0, sequential: false))
        let hostEnd = s.apply(.endSession(id: hostSession, expired: true), index: s.appliedIndex + 1)
        #expect(hostEnd.events.map(\.kind) == [.put, .delete, .hostLeft], "its process lost, its channel gone")
        #expect(s.hosts[hostA]?.state == .expired)
        #expect(s.descendants(of: "/\(hostA)") == ["/\(hostA)/job"], "a dead host's process stays, lost")
        guard case .proc(let lost)? = s.anchors["/\(hostA)/job"]?.element else { Issue.record("no process"); return }
        #expect(lost.phase == .lost)
        let late = s.run(.create(path: "/\(hostA)/x", element: .chan(capacity: 1), session: 0, sequential: false))[0]
        #expect(failure(late) == .hostNotAlive(hostA))
    }

    @Test("a host that rejoins keeps its subtree and gets a new session; a graceful leave removes the subtree")
    func rejoinAndLeave() {
        var s = ControlState()
        s.run(.registerHost(id: hostB, peerAddress: "p", clientAddress: "c", role: .voter, ttlMillis: 3000))
        s.run(.create(path: "/\(hostB)/c", element: .chan(capacity: 1), session: 0, sequential: false))
        let first = s.hosts[hostB]!.session
        s.run(.registerHost(id: hostB, peerAddress: "p2", clientAddress: "c2", role: .voter, ttlMillis: 3000))
        #expect(s.hosts[hostB]!.session != first)
        #expect(s.sessions[first] == nil)
        #expect(s.anchors["/\(hostB)/c"]?.element == .chan(capacity: 1))
        s.run(.leaveHost(id: hostB))
        #expect(s.hosts[hostB]?.state == .left)
        #expect(s.anchors["/\(hostB)/c"] == nil)
        let again = s.run(.leaveHost(id: hostB))[0]
        #expect(failure(again) == .hostNotAlive(hostB))
    }

    @Test("the history keeps at least its limit of events, drops whole revisions, and reads back what was applied")
    func historyRetention() throws {
        var s = ControlState(historyLimit: 100)
        for i in 0..<1000 {
            s.run(.put(path: "/records/h/\(i % 7)", value: [UInt8](repeating: UInt8(i % 251), count: 64), session: 0))
            if i == 500 {
                // One revision of many events: a transaction of 40 puts.
                let r = s.run(.transaction((0..<40).map { .put(path: "/records/t/\($0)", value: [1], session: 0) }))
                #expect(ok(r[0]))
            }
        }
        let retained = try s.events(after: s.compactedThrough).get()
        #expect(retained.count >= 100 && retained.count <= 100 + 100 / 8 + 40, "retained \(retained.count)")
        #expect(retained.first!.revision == s.compactedThrough + 1, "the history starts right after what it dropped")
        #expect(retained.last!.revision == s.revision)
        #expect(zip(retained, retained.dropFirst()).allSatisfy { $0.revision <= $1.revision })
        // What it reads back is what was applied, value and all.
        #expect(retained.last!.element == .record([UInt8](repeating: UInt8(999 % 251), count: 64)))
        #expect(retained.last!.path == "/records/h/\(999 % 7)")
        #expect(s.events(after: s.compactedThrough - 1) == .failure(.compacted(resumeFrom: s.compactedThrough + 1)))
    }

    @Test("watches read every change after a revision under a prefix, or learn the history was compacted")
    func watches() {
        var s = ControlState(historyLimit: 4)
        for i in 0..<3 { s.run(.put(path: "/records/w/\(i)", value: [UInt8(i)], session: 0)) }
        s.run(.put(path: "/records/other", value: [], session: 0))
        let w = try! s.events(after: 1, prefix: "/records/w").get()
        #expect(w.map(\.path) == ["/records/w/1", "/records/w/2"])
        #expect(w.map(\.revision) == [2, 3])
        for i in 0..<10 { s.run(.put(path: "/records/x", value: [UInt8(i)], session: 0)) }
        #expect(s.events(after: 1) == .failure(.compacted(resumeFrom: s.compactedThrough + 1)))
        #expect(s.compactedThrough > 1)
        #expect(WatchError.compacted(resumeFrom: 9).description.contains("resume from revision 9"))
        let recent = try! s.events(after: s.compactedThrough).get()
        #expect(!recent.isEmpty && recent.last!.revision == s.revision)
    }

    @Test("a process's state is reported by its host, and only to a proc")
    func processUpdates() {
        var s = ControlState()
        s.run(.registerHost(id: hostA, peerAddress: "p", clientAddress: "c", role: .worker, ttlMillis: 3000))
        let cmd = ProcCommand(path: "/bin/sleep", args: ["1"])
        s.run(.create(path: "/\(hostA)/p", element: .proc(ProcState(command: cmd)), session: 0, sequential: false))
        let running = ProcState(command: cmd, phase: .running, pid: 4242, startedAt: 1_700_000_000_000, attempts: 1)
        let update = s.run(.updateProc(path: "/\(hostA)/p", state: running))[0]
        #expect(ok(update))
        #expect(s.anchors["/\(hostA)/p"]?.element == .proc(running))
        s.run(.put(path: "/records/r", value: [], session: 0))
        let wrong = s.run(.updateProc(path: "/records/r", state: running))[0]
        #expect(failure(wrong) == .wrongKind(path: "/records/r", expected: "proc", actual: "record"))
        let missing = s.run(.updateProc(path: "/\(hostA)/none", state: running))[0]
        #expect(failure(missing) == .notFound(path: "/\(hostA)/none"))
    }
}

@Suite("Lease keeper")
struct LeaseKeeperTests {
    @Test("keep-alives extend a session; unknown sessions are refused; expiry comes oldest first")
    func keepAlives() {
        var k = LeaseKeeper()
        k.track(1, ttl: 100, now: 0)
        k.track(2, ttl: 50, now: 0)
        let known = k.keepAlive(1, now: 90)
        let unknown = k.keepAlive(9, now: 90)
        #expect(known && !unknown)
        #expect(k.expired(now: 60) == [2])
        #expect(k.expired(now: 200) == [2, 1])
        k.forget(2)
        #expect(k.expired(now: 200) == [1])
        #expect(k.nextDeadline == 190)
    }

    @Test("a new leader gives every session a full TTL from its election")
    func newLeaderGrace() {
        var k = LeaseKeeper()
        k.becameLeader(
            sessions: [Session(id: 5, ttlMillis: 1000, owner: hostA, createdAt: 1), Session(id: 6, ttlMillis: 10, owner: "c", createdAt: 1)],
            now: 10_000)
        #expect(k.expired(now: 10_009).isEmpty)
        #expect(k.expired(now: 10_010) == [6])
        #expect(k.expired(now: 10_999) == [6])
    }
}

@Suite("Command results on the wire")
struct ResultCodecTests {
    @Test("every error round-trips, and bad bytes are refused naming what is wrong", arguments: [
        ControlError.invalidName(path: "/x y", why: "a space"), .exists(path: "/records/a", kind: "record"),
        .notFound(path: "/records/b"), .versionMismatch(path: "/records/c", expected: 3, actual: 4),
        .wrongKind(path: "/records/d", expected: "record", actual: "chan"), .noSuchSession(7), .noSuchHost("X0"),
        .hostNotAlive("X1"), .transactionFailed(index: 2, .notFound(path: "/records/e")), .malformedCommand("why"),
        .tooManySessions(owner: "alice", limit: 3),
    ])
    func errors(_ error: ControlError) throws {
        let bytes = CommandResult.failed(error).encoded
        #expect(try CommandResult(decoding: bytes) == .failed(error))
        #expect(throws: ControlError.self) { try CommandResult(decoding: Array(bytes.dropLast())) }
        #expect(throws: ControlError.self) { try CommandResult(decoding: bytes + [0]) }
    }

    @Test("a transaction failure inside a transaction failure is refused")
    func nested() {
        let bytes = CommandResult.failed(.transactionFailed(index: 0, .transactionFailed(index: 1, .noSuchSession(1)))).encoded
        #expect(throws: ControlError.malformedCommand("nested transaction failure")) { try CommandResult(decoding: bytes) }
    }
}

@Suite("What a watch covers")
struct PathPrefixTests {
    @Test("a prefix covers itself and what is below it, not a sibling that shares its letters; / covers every path", arguments: [
        ("/", "/records/a", true), ("/", "/", true),
        ("/records/a", "/records/a", true), ("/records/a", "/records/a/b", true), ("/records/a", "/records/ab", false),
        ("/records/a", "/records", false), ("/records/a/", "/records/a/b", true), ("/records/a/", "/records/ab", false),
        ("/records/a/", "/records/a", false), ("/records/a/", "/records/a/", true),
    ])
    func covers(prefix: String, path: String, covered: Bool) {
        #expect(PathPrefix(prefix).covers(path) == covered, "\(prefix) over \(path)")
    }
}
