import Foundation
import Synchronization

func nowNanos() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

/// What one chaos run did: operations by kind and outcome, faults by kind, the nemesis's schedule (each fault with
/// when it began and healed), and the violations found.
final class ChaosLog: Sendable {
    struct Fault: Sendable {
        var kind: String
        var detail: String
        var began: UInt64
        var healed: UInt64?
    }

    private struct State {
        var ops: [String: Int] = [:]
        var faults: [Fault] = []
        var violations: [String] = []
        var figures: [(String, String)] = []
    }

    private let state = Mutex(State())
    let start = nowNanos()

    func op(_ kind: String) { state.withLock { $0.ops[kind, default: 0] += 1 } }

    /// A fault begins; answers its number, for `healed`.
    func fault(_ kind: String, _ detail: String) -> Int {
        state.withLock {
            $0.faults.append(Fault(kind: kind, detail: detail, began: nowNanos()))
            return $0.faults.count - 1
        }
    }

    func healed(_ fault: Int) { state.withLock { $0.faults[fault].healed = nowNanos() } }

    /// A figure for the summary (histories checked, events seen...).
    func figure(_ name: String, _ value: String) { state.withLock { $0.figures.append((name, value)) } }
    var figures: String { state.withLock { $0.figures.map { "\($0.0): \($0.1)" }.joined(separator: "; ") } }

    func violation(_ text: String) { state.withLock { $0.violations.append(text) } }
    var violations: [String] { state.withLock { $0.violations } }

    /// The latest moment, up to `time`, at which some fault was still unhealed (`time` itself if one is active then;
    /// nil if none had begun).
    func lastDisturbance(atOrBefore time: UInt64) -> UInt64? {
        state.withLock { s in
            s.faults.filter { $0.began <= time }.map { min($0.healed ?? .max, time) }.max()
        }
    }

    var operations: String {
        state.withLock { s in s.ops.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ") }
    }

    var faultCounts: String {
        state.withLock { s in
            Dictionary(grouping: s.faults, by: \.kind).map { ($0.key, $0.value.count) }.sorted { $0.0 < $1.0 }
                .map { "\($0.0) \($0.1)" }.joined(separator: ", ")
        }
    }

    /// The nemesis's schedule, one line per fault: seconds from the start when it began and when it healed.
    var schedule: String {
        state.withLock { s in
            s.faults.map { f in
                "  \(seconds(f.began)) … \(f.healed.map(seconds) ?? "never healed")  \(f.kind): \(f.detail)"
            }.joined(separator: "\n")
        }
    }

    func seconds(_ t: UInt64) -> String { String(format: "%7.2fs", Double(t &- start) / 1e9) }
}

/// A small seeded generator (splitmix64): a run's choices are replayed with `CHAOS_SEED` (the timing is not).
struct SeededRandom: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
