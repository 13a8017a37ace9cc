import PropertyBased
import Testing

@testable import CircuitStateMachine

/// Turns a list of random numbers into commands over a small universe of names, so that commands collide often:
/// the same paths, hosts and sessions come back again and again.
func commands(from seeds: [Int]) -> [Command] {
    let hosts = [hostA, hostB]
    let paths = ["/records/a", "/records/a/b", "/records/c", "/records/q/item-", "/\(hostA)/x", "/\(hostA)/x/y", "/\(hostB)/z"]
    var out: [Command] = []
    for (i, seed) in seeds.enumerated() {
        let n = seed / 16
        let path = paths[n % paths.count]
        let session = SessionID(max(1, i - n % 5))  // often a real session: an index granted a few entries back
        let value = [UInt8(truncatingIfNeeded: n)]
        switch seed % 16 {
        case 0, 1: out.append(.registerHost(id: hosts[n % 2], peerAddress: "p\(n)", clientAddress: "c", role: .worker, ttlMillis: 100))
        case 2: out.append(.leaveHost(id: hosts[n % 2]))
        case 3: out.append(.grantSession(owner: "client\(n % 2)", ttlMillis: 50, limit: n % 3 == 0 ? 2 : 0))
        case 4: out.append(.endSession(id: session, expired: n % 2 == 0))
        case 5: out.append(.create(path: path, element: n % 7 == 0 ? .reserved("proc") : n % 3 == 0 ? .chan(capacity: 2) : .record(value), session: n % 2 == 0 ? session : 0, sequential: path.hasSuffix("-")))
        case 6, 7: out.append(.put(path: path, value: value, session: n % 3 == 0 ? session : 0))
        case 8: out.append(.compareAndSet(path: path, version: UInt64(n % 3), value: value))
        case 9, 10: out.append(.delete(path: path, version: n % 2 == 0 ? nil : UInt64(n % 3)))
        case 11:
            out.append(.updateProc(path: path, state: ProcState(command: ProcCommand(path: "/bin/true"), phase: .running, pid: Int64(n))))
        case 12:
            out.append(.create(path: path, element: .proc(ProcState(command: ProcCommand(path: "/bin/echo", args: ["\(n)"]))), session: 0, sequential: false))
        case 13 where n % 4 == 0:
            out.append(.setHostRole(id: hosts[n % 2], role: n % 3 == 0 ? .voter : .learner))
        default:
            out.append(
                .transaction([
                    .check(path: paths[(n + 1) % paths.count], version: UInt64(n % 2)),
                    .put(path: path, value: value, session: 0),
                    .delete(path: paths[(n + 2) % paths.count], version: nil),
                ].prefix(1 + n % 3).map { $0 }))
        }
    }
    return out
}

let commandSeeds = Gen.int(in: 0...10_000).array(of: 1...120)

@Suite("Control state: properties over random command sequences")
struct PropertyTests {
    @Test("two replicas applying the same log hold byte-identical state and give identical results")
    func determinism() async {
        await propertyCheck(count: 200, input: commandSeeds) { seeds in
            var a = ControlState()
            var b = ControlState()
            var resultsA: [CommandResult] = []
            var resultsB: [CommandResult] = []
            for (i, c) in commands(from: seeds).enumerated() {
                resultsA.append(a.apply(c, index: UInt64(i + 1)).result)
                resultsB.append(b.apply(c, index: UInt64(i + 1)).result)
            }
            #expect(resultsA == resultsB)
            #expect(a.snapshot() == b.snapshot())
        }
    }

    /// With a history limit of 16 the watch history drops its oldest events many times over, so the restored
    /// replica must drop what the other drops.
    @Test("a replica restored from a snapshot at i and fed the rest equals one that applied everything", arguments: [16, 1000])
    func snapshotEquivalence(historyLimit: Int) async {
        await propertyCheck(count: 200, input: commandSeeds, Gen.int(in: 0...120)) { seeds, cut in
            let cmds = commands(from: seeds)
            let k = min(cut, cmds.count)
            var full = ControlState(historyLimit: historyLimit)
            var partial = ControlState(historyLimit: historyLimit)
            for (i, c) in cmds.enumerated() {
                _ = full.apply(c, index: UInt64(i + 1))
                if i < k { _ = partial.apply(c, index: UInt64(i + 1)) }
            }
            let bytes = partial.snapshot()
            guard var restored = try? ControlState(restoring: bytes) else {
                Issue.record("restore failed")
                return
            }
            #expect(restored.snapshot() == bytes, "restore then snapshot is byte-identical")
            for (i, c) in cmds.enumerated() where i >= k { _ = restored.apply(c, index: UInt64(i + 1)) }
            #expect(restored.snapshot() == full.snapshot())
            #expect(restored.anchors == full.anchors)
        }
    }

    @Test("invariants hold after every command, and the watch stream equals the change log")
    func invariants() async {
        await propertyCheck(count: 200, input: commandSeeds) { seeds in
            var s = ControlState(historyLimit: 10_000)
            var log: [WatchEvent] = []
            var lastRevision: Revision = 0
            for (i, c) in commands(from: seeds).enumerated() {
                let outcome = s.apply(c, index: UInt64(i + 1))
                log += outcome.events
                // Revisions strictly increase from change to change, and one change is one revision.
                if !outcome.events.isEmpty {
                    #expect(Set(outcome.events.map(\.revision)) == [s.revision])
                    #expect(s.revision == lastRevision + 1)
                } else {
                    #expect(s.revision == lastRevision)
                }
                lastRevision = s.revision
                for (path, anchor) in s.anchors {
                    // No ephemeral element outlives its session.
                    if anchor.session != 0 { #expect(s.sessions[anchor.session] != nil, "\(path) outlived session \(anchor.session)") }
                    // Elements under a host exist only while it is alive, but for the processes of a host that died,
                    // kept as they ended (lost, if they had not).
                    if let element = anchor.element, let host = Names.host(of: path), s.hosts[host]?.state != .alive {
                        guard case .proc(let p) = element else {
                            Issue.record("\(path) outlived its host")
                            continue
                        }
                        #expect(p.phase == .lost || p.phase == .exited || p.phase == .signaled, "\(path) is \(p.phase) under a dead host")
                        #expect(s.hosts[host]?.state == .expired, "a host that left takes its processes with it")
                    }
                    // The tree is consistent: every anchor is listed by its parent, and holds something.
                    let cut = String(path[..<path.lastIndex(of: "/")!])
                    let parent = cut.isEmpty ? "/" : cut
                    let name = String(path[path.index(after: path.lastIndex(of: "/")!)...])
                    #expect(s.children(of: parent).contains(name))
                    #expect(anchor.element != nil || !s.children(of: path).isEmpty || s.nextSequence(under: path) > 0)
                }
            }
            #expect((try? s.events(after: 0).get()) == log)
        }
    }

    @Test("every command, and every result applying it gives, round-trips through its binary form")
    func codecRoundTrip() async {
        await propertyCheck(count: 100, input: commandSeeds) { seeds in
            var state = ControlState()
            for (i, c) in commands(from: seeds).enumerated() {
                #expect((try? Command(decoding: c.encoded)) == c)
                let result = state.apply(c, index: UInt64(i + 1)).result
                #expect((try? CommandResult(decoding: result.encoded)) == result)
            }
        }
    }

    @Test("truncated or corrupted command bytes give an error, never a crash")
    func malformedBytes() async {
        await propertyCheck(count: 100, input: commandSeeds, Gen.int(in: 0...1000)) { seeds, cut in
            for c in commands(from: seeds).prefix(5) {
                let bytes = c.encoded
                let truncated = Array(bytes.prefix(cut % bytes.count))
                #expect(throws: ControlError.self) { try Command(decoding: truncated) }
                var flipped = bytes
                flipped[1] = 0xEE  // an unknown command tag
                #expect(throws: ControlError.malformedCommand("command tag 238")) { try Command(decoding: flipped) }
            }
        }
    }
}
