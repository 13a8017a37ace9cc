import Testing

/// Histories with known answers, including the classic ones of the Knossos and Porcupine test suites.
@Suite("The linearizability checker")
struct LinearizabilityTests {
    typealias Op = Operation<RegisterModel.Input, RegisterModel.Output>
    let checker = LinearizabilityChecker(model: RegisterModel())

    func op(_ client: Int, _ input: RegisterModel.Input, _ output: RegisterModel.Output?, _ call: UInt64, _ returned: UInt64?) -> Op {
        Op(client: client, input: input, output: output, call: call, returned: returned)
    }

    @Test("a sequential history that follows the rules is linearizable; one that reads a value never written is not")
    func sequential() {
        let good = [op(0, .write("a"), .ok(version: 1), 0, 1), op(0, .read, .value("a", version: 1), 2, 3)]
        #expect(checker.check(good) == .linearizable)
        let bad = [op(0, .write("a"), .ok(version: 1), 0, 1), op(0, .read, .value("b", version: 1), 2, 3)]
        #expect(checker.check(bad) == .violation(placed: 1, stuck: [1]))
    }

    @Test("concurrent operations may take effect in either order; a read after both returned must see the later")
    func concurrent() {
        // Two overlapping writes, then a read that sees "a": "b" took effect first.
        let h = [
            op(0, .write("a"), .ok(version: 2), 0, 10), op(1, .write("b"), .ok(version: 1), 1, 9),
            op(2, .read, .value("a", version: 2), 11, 12),
        ]
        #expect(checker.check(h) == .linearizable)
        // A stale read: after a write returned, a later read sees the older state.
        let stale = [
            op(0, .write("a"), .ok(version: 1), 0, 1), op(1, .write("b"), .ok(version: 2), 2, 3),
            op(2, .read, .value("a", version: 1), 4, 5),
        ]
        if case .linearizable = checker.check(stale) { Issue.record("a stale read passed") }
    }

    @Test("an operation of unknown outcome may have happened, at any time after its call, or not at all")
    func unknownOutcome() {
        // The write timed out; a later read sees it: fine. Another later read does not: also fine, if it came first.
        let seen = [op(0, .write("a"), nil, 0, nil), op(1, .read, .value("a", version: 1), 5, 6)]
        #expect(checker.check(seen) == .linearizable)
        let unseen = [op(0, .write("a"), nil, 0, nil), op(1, .read, .value(nil, version: 0), 5, 6)]
        #expect(checker.check(unseen) == .linearizable)
        // But once a read saw it, a later read cannot miss it.
        let flicker = [
            op(0, .write("a"), nil, 0, nil), op(1, .read, .value("a", version: 1), 5, 6), op(1, .read, .value(nil, version: 0), 7, 8),
        ]
        if case .linearizable = checker.check(flicker) { Issue.record("a value that appeared and vanished passed") }
    }

    @Test("an unknown write that a later version counts must have happened, in time: before the write that answered the next version")
    func unknownWriteCounted() {
        let counted = [op(0, .write("a"), nil, 0, nil), op(1, .write("b"), .ok(version: 2), 5, 6), op(2, .read, .value("b", version: 2), 7, 8)]
        #expect(checker.check(counted) == .linearizable)
        // Called only after the version-2 write returned, it cannot be the first write.
        let late = [op(1, .write("b"), .ok(version: 2), 0, 1), op(0, .write("a"), nil, 5, nil)]
        if case .linearizable = checker.check(late) { Issue.record("a version was answered before the write that made room for it") }
    }

    @Test("many operations of unknown outcome that change nothing (compare-and-sets that cannot apply) do not blow the search up", .timeLimit(.minutes(1)))
    func manyUnknownNoOps() {
        // 64 timed-out compare-and-sets at a version never reached, all still pending at the end, among 600 answered
        // writes and reads: placing each no-op anywhere would be 2^64 branches.
        var h: [Op] = []
        var version: UInt64 = 0
        var time: UInt64 = 0
        for i in 0..<600 {
            if i % 10 == 0 { h.append(op(9, .compareAndSet(version: 1_000_000, value: "x\(i)"), nil, time, nil)) }
            if i % 2 == 0 {
                version += 1
                h.append(op(i % 8, .write("v\(i)"), .ok(version: version), time, time + 3))
            } else {
                h.append(op(i % 8, .read, .value("v\(i - 1)", version: version), time + 1, time + 4))
            }
            time += 5
        }
        #expect(checker.check(h) == .linearizable)
    }

    @Test("unknown outcomes resolved from the history itself: a write a read saw took effect at the version seen; with no version unaccounted for, the rest are left out; and a resolved history fails exactly when the original does")
    func resolvingUnknowns() {
        let seen = [
            op(0, .write("a"), nil, 0, nil), op(1, .compareAndSet(version: 7, value: "x"), nil, 1, nil),
            op(2, .read, .value("a", version: 1), 5, 6), op(3, .write("b"), .ok(version: 2), 7, 8),
            op(4, .read, .value("b", version: 2), 9, 10),
        ]
        let resolved = RegisterModel.resolveUnknowns(seen)
        #expect(resolved.count == 4)
        #expect(resolved[0].output == .ok(version: 1))
        #expect(checker.check(resolved) == .linearizable)
        // Without a final read, an unknown write may be what a later answer needs: it stays. (W a ok 1; W b unknown;
        // a compare-and-set at version 1 refused: only if b took effect first.)
        let noFinalRead = [
            op(0, .write("a"), .ok(version: 1), 0, 1), op(1, .write("b"), nil, 2, nil),
            op(2, .compareAndSet(version: 1, value: "c"), .mismatch, 5, 6),
        ]
        #expect(RegisterModel.resolveUnknowns(noFinalRead).count == 3)
        #expect(checker.check(RegisterModel.resolveUnknowns(noFinalRead)) == .linearizable)
        // A version no known write made: the unknown ones stay, for the search to place.
        let gap = [
            op(0, .write("a"), nil, 0, nil), op(1, .write("z"), nil, 0, nil), op(3, .write("b"), .ok(version: 2), 7, 8),
            op(4, .read, .value("b", version: 2), 9, 10),
        ]
        #expect(RegisterModel.resolveUnknowns(gap).count == 4)
        #expect(checker.check(RegisterModel.resolveUnknowns(gap)) == .linearizable)
        // Seen before it was called: still a violation once resolved.
        let early = [op(2, .read, .value("a", version: 1), 0, 1), op(0, .write("a"), nil, 5, nil)]
        if case .linearizable = checker.check(RegisterModel.resolveUnknowns(early)) { Issue.record("a value read before its write was called passed") }
        if case .linearizable = checker.check(early) { Issue.record("the unresolved history passed too") }
        // An acknowledged write lost: a later read sees the version before it.
        let lost = [op(0, .write("a"), .ok(version: 1), 0, 1), op(1, .write("b"), nil, 2, nil), op(2, .read, .value(nil, version: 0), 5, 6)]
        if case .linearizable = checker.check(RegisterModel.resolveUnknowns(lost)) { Issue.record("a lost write passed") }
    }

    @Test("names: two creates that race cannot both succeed; a remove of what a create made, seen by a later create")
    func names() {
        let checker = LinearizabilityChecker(model: NameModel())
        typealias N = Operation<NameModel.Input, NameModel.Output>
        let both = [N(client: 0, input: .create, output: .ok, call: 0, returned: 5), N(client: 1, input: .create, output: .ok, call: 1, returned: 6)]
        if case .linearizable = checker.check(both) { Issue.record("a name was made twice") }
        let cycle = [
            N(client: 0, input: .create, output: .ok, call: 0, returned: 1), N(client: 1, input: .create, output: .refused, call: 2, returned: 3),
            N(client: 2, input: .remove, output: nil, call: 4, returned: nil), N(client: 1, input: .create, output: .ok, call: 6, returned: 7),
        ]
        #expect(checker.check(cycle) == .linearizable)
        var lost = cycle
        lost[2].output = .refused
        lost[2].returned = 5
        if case .linearizable = checker.check(lost) { Issue.record("a create succeeded on a name that was never removed") }
    }

    @Test("compare-and-set: two that race at the same version cannot both succeed")
    func compareAndSet() {
        let both = [
            op(0, .compareAndSet(version: 0, value: "a"), .ok(version: 1), 0, 5),
            op(1, .compareAndSet(version: 0, value: "b"), .ok(version: 1), 1, 6),
        ]
        if case .linearizable = checker.check(both) { Issue.record("two compare-and-sets at version 0 both succeeded") }
        let one = [
            op(0, .compareAndSet(version: 0, value: "a"), .ok(version: 1), 0, 5),
            op(1, .compareAndSet(version: 0, value: "b"), .mismatch, 1, 6),
            op(2, .read, .value("a", version: 1), 7, 8),
        ]
        #expect(checker.check(one) == .linearizable)
    }

    @Test("a long history of many clients is checked quickly thanks to the memo (a generated linearizable run, then one corrupted read)")
    func longHistory() {
        // A generated run: 8 clients, each op overlapping its neighbours, applied in call order.
        var state = RegisterModel().initial
        var h: [Op] = []
        var time: UInt64 = 0
        for i in 0..<400 {
            let client = i % 8
            let input: RegisterModel.Input = i % 3 == 0 ? .read : .write("v\(i)")
            let output: RegisterModel.Output
            switch input {
            case .read: output = .value(state.value, version: state.version)
            case .write(let v):
                state = RegisterModel.State(value: v, version: state.version + 1)
                output = .ok(version: state.version)
            case .compareAndSet: output = .mismatch
            }
            // Called just before the previous op returned; returned just after the next is called.
            h.append(op(client, input, output, time, time + 3))
            time += 2
        }
        #expect(checker.check(h) == .linearizable)
        var corrupted = h
        corrupted[300].output = .value("never written", version: 1)
        if case .linearizable = checker.check(corrupted) { Issue.record("a corrupted read passed") }
    }
}
