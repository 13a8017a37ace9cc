/// A linearizability checker for histories of concurrent operations: Wing and Gong's search for an order of the
/// operations that respects real time and the model's sequential rules, with Lowe's memoisation of the states
/// already explored (the algorithm of Knossos and Porcupine).
///
/// An operation whose outcome is unknown (the client timed out: "info") has no return time: it may have taken effect
/// at any moment after its call, or never. The model says what it may have done (`Model.step` with no output).

/// The sequential rules of what is being checked.
protocol LinearizabilityModel {
    associatedtype State: Hashable
    associatedtype Input
    associatedtype Output
    var initial: State { get }
    /// The states the operation may leave, done on `state`: empty if it could not have answered `output` there.
    /// With `output` nil (outcome unknown), the states it may have left if it took effect and changed something.
    /// That it never happened (or happened and changed nothing) the checker always tries: such an operation is
    /// simply never placed, so a model must not answer `state` itself for it (each place it could be put would be a
    /// new branch of the search, 2^k of them for k such operations).
    func step(_ state: State, _ input: Input, _ output: Output?) -> [State]
}

/// One operation of a history.
struct Operation<Input, Output> {
    var client: Int
    var input: Input
    /// nil: unknown (it may or may not have taken effect).
    var output: Output?
    /// Monotonic times of the call and of the return (nil: it never returned).
    var call: UInt64
    var returned: UInt64?
}

enum LinearizabilityResult: Equatable {
    case linearizable
    /// No order exists. `stuck`: the indexes of the operations that could not be placed after the longest order
    /// found (`placed` operations long) — where to look.
    case violation(placed: Int, stuck: [Int])
    /// The search gave up after `explored` states (the checker's budget): neither proven nor refuted.
    case undecided(explored: Int)
}

struct LinearizabilityChecker<Model: LinearizabilityModel> {
    let model: Model
    /// The most states the search may remember before it gives up (`undecided`) rather than grow without bound.
    var budget = 5_000_000

    func check(_ history: [Operation<Model.Input, Model.Output>]) -> LinearizabilityResult {
        let n = history.count
        if n == 0 { return .linearizable }
        // Events in time order, a call before a return at the same time (so they count as overlapping).
        var events: [HistoryEvent] = []
        for (i, op) in history.enumerated() {
            events.append(HistoryEvent(op: i, isCall: true, time: op.call))
            events.append(HistoryEvent(op: i, isCall: false, time: op.returned ?? UInt64.max))
        }
        events.sort { ($0.time, $0.isCall ? 0 : 1, $0.op) < ($1.time, $1.isCall ? 0 : 1, $1.op) }
        // A doubly linked list over the events (index 0 is a head sentinel), with each call's return.
        let count = events.count + 1
        var next = Array(1...count)
        var prev = Array(-1..<(count - 1))
        next[count - 1] = -1
        var returnOf = [Int](repeating: 0, count: n)
        for (k, e) in events.enumerated() where !e.isCall { returnOf[e.op] = k + 1 }
        func lift(_ call: Int) {
            for node in [call, returnOf[events[call - 1].op]] {
                next[prev[node]] = next[node]
                if next[node] >= 0 { prev[next[node]] = prev[node] }
            }
        }
        func unlift(_ call: Int) {
            for node in [returnOf[events[call - 1].op], call] {
                next[prev[node]] = node
                if next[node] >= 0 { prev[next[node]] = node }
            }
        }

        // Done once every operation with an answer is placed; one of unknown outcome may stay out (never happened).
        let answered = history.filter { $0.output != nil }.count
        var placedAnswered = 0
        var placed = Bits(count: n)
        var state = model.initial
        var seen: Set<Memo> = []
        // A frame: the call placed, the state before it, the other states it may have left (to try on backtracking).
        var stack: [(call: Int, before: Model.State, others: [Model.State])] = []
        var best = (placed: 0, stuck: [Int]())
        var entry = next[0]

        func tryPlace(_ call: Int, _ candidates: [Model.State], before: Model.State) -> Bool {
            var rest = candidates
            while let candidate = rest.first {
                rest.removeFirst()
                var bits = placed
                bits.insert(events[call - 1].op)
                if seen.insert(Memo(placed: bits, state: candidate)).inserted {
                    if seen.count > budget { return false }
                    stack.append((call, before, rest))
                    if history[events[call - 1].op].output != nil { placedAnswered += 1 }
                    placed = bits
                    state = candidate
                    lift(call)
                    return true
                }
            }
            return false
        }

        while placedAnswered < answered {
            if seen.count > budget { return .undecided(explored: seen.count) }
            if entry >= 0 && events[entry - 1].isCall {
                let op = history[events[entry - 1].op]
                if tryPlace(entry, model.step(state, op.input, op.output), before: state) {
                    entry = next[0]
                } else {
                    entry = next[entry]
                }
                continue
            }
            // A return (or the end) before anything more could be placed: undo the last placement.
            if stack.count > best.placed || best.stuck.isEmpty {
                var stuck: [Int] = []
                var e = next[0]
                while e >= 0 {
                    if events[e - 1].isCall { stuck.append(events[e - 1].op) } else { break }
                    e = next[e]
                }
                if stack.count >= best.placed { best = (stack.count, stuck) }
            }
            guard let frame = stack.popLast() else { return .violation(placed: best.placed, stuck: best.stuck) }
            unlift(frame.call)
            placed.remove(events[frame.call - 1].op)
            if history[events[frame.call - 1].op].output != nil { placedAnswered -= 1 }
            state = frame.before
            if tryPlace(frame.call, frame.others, before: frame.before) {
                entry = next[0]
            } else {
                entry = next[frame.call]
            }
        }
        return .linearizable
    }

    private struct Memo: Hashable {
        var placed: Bits
        var state: Model.State
    }
}

/// An operation's call or return, at its time.
struct HistoryEvent {
    var op: Int
    var isCall: Bool
    var time: UInt64
}

extension Operation: Sendable where Input: Sendable, Output: Sendable {}

/// A set of operation indexes as bits.
struct Bits: Hashable {
    private var words: [UInt64]
    init(count: Int) { words = [UInt64](repeating: 0, count: (count + 63) / 64) }
    mutating func insert(_ i: Int) { words[i / 64] |= 1 << UInt64(i % 64) }
    mutating func remove(_ i: Int) { words[i / 64] &= ~(1 << UInt64(i % 64)) }
}

/// A register holding a value (nil: absent), with versions as the cluster's records have: read, write,
/// compare-and-set on the version.
struct RegisterModel: LinearizabilityModel {
    struct State: Hashable, Sendable {
        var value: String?
        var version: UInt64
    }
    enum Input: Sendable {
        case read
        case write(String)
        /// Sets `value` only if the record is at `version` (0: absent).
        case compareAndSet(version: UInt64, value: String)
    }
    enum Output: Equatable, Sendable {
        /// A read's answer: the value and its version.
        case value(String?, version: UInt64)
        /// A write's or a successful compare-and-set's new version.
        case ok(version: UInt64)
        case mismatch
    }

    var initial: State { State(value: nil, version: 0) }

    func step(_ s: State, _ input: Input, _ output: Output?) -> [State] {
        switch input {
        case .read:
            guard let output else { return [] }  // a read changes nothing
            return output == .value(s.value, version: s.version) ? [s] : []
        case .write(let v):
            let after = State(value: v, version: s.version + 1)
            guard let output else { return [after] }
            return output == .ok(version: after.version) ? [after] : []
        case .compareAndSet(let version, let v):
            let applies = s.version == version
            let after = State(value: v, version: s.version + 1)
            guard let output else { return applies ? [after] : [] }
            switch output {
            case .ok(let n): return applies && n == after.version ? [after] : []
            case .mismatch: return applies ? [] : [s]
            case .value: return []
            }
        }
    }
}

extension RegisterModel {
    /// What a history proves about its own operations of unknown outcome, given that every write carries a value
    /// no other write carries: a write (or compare-and-set) whose value a read saw took effect, and made the version
    /// that read saw. And if the history ends with a read called after every other answered operation returned, and
    /// every version up to the highest any answer names is made by a known write, no other write of unknown outcome
    /// took effect before that read (one that took effect after it constrains nothing, as if it never happened), so
    /// those are left out. Only sound for histories whose written values are unique; the answer is linearizable
    /// exactly when the history is, and is much cheaper to search.
    static func resolveUnknowns(_ history: [Operation<Input, Output>]) -> [Operation<Input, Output>] {
        var seenAt: [String: Set<UInt64>] = [:]
        var highest: UInt64 = 0
        var made: Set<UInt64> = []
        for op in history {
            switch op.output {
            case .value(let v, let version)?:
                if let v { seenAt[v, default: []].insert(version) }
                highest = max(highest, version)
            case .ok(let version)?:
                made.insert(version)
                highest = max(highest, version)
            default: break
            }
        }
        var resolved = history
        for (i, op) in history.enumerated() where op.output == nil {
            guard let value = op.input.written, let versions = seenAt[value], versions.count == 1, let v = versions.first else { continue }
            resolved[i].output = .ok(version: v)
            made.insert(v)
        }
        let gaps = highest == 0 ? false : (1...highest).contains { !made.contains($0) }
        let answered = history.indices.filter { history[$0].output != nil }
        let finalRead = answered.contains { r in
            guard case .value? = history[r].output else { return false }
            return answered.allSatisfy { $0 == r || (history[$0].returned ?? .max) <= history[r].call }
        }
        return gaps || !finalRead ? resolved : resolved.filter { $0.output != nil }
    }
}

extension RegisterModel.Input {
    /// The value a write or compare-and-set writes.
    var written: String? {
        switch self {
        case .read: return nil
        case .write(let v), .compareAndSet(_, let v): return v
        }
    }
}

/// A name that is made and removed (an element of the namespace, a channel here): create fails if it exists, remove
/// if it does not.
struct NameModel: LinearizabilityModel {
    enum Input: Sendable {
        case create
        case remove
    }
    enum Output: Equatable, Sendable {
        case ok
        /// create: it existed; remove: it did not.
        case refused
    }

    var initial: Bool { false }

    func step(_ exists: Bool, _ input: Input, _ output: Output?) -> [Bool] {
        let applies = input == .create ? !exists : exists
        guard let output else { return applies ? [!exists] : [] }
        switch output {
        case .ok: return applies ? [!exists] : []
        case .refused: return applies ? [] : [exists]
        }
    }
}
