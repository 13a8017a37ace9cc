import CircuitAPI
import CircuitClient
import CircuitStateMachine
import Foundation
import Synchronization

/// One wait of a select, as a pure value: the first clause proposed wins; every later proposal is refused; a wait
/// whose client went away refuses everything.
struct SelectRun: Sendable {
    private(set) var decided: Int?
    private(set) var outcome: SelectOutcomeView?
    private(set) var abandoned = false

    /// Whether clause `outcome.clause` fires: true for the first, and again for that clause if its channel asks
    /// again (its first answer was lost); never after the wait was abandoned. A clause decided as failed (its offer
    /// was refused, or its answer never came back) never fires afterwards: its client was told it failed, so a late
    /// match of an offer that did reach its channel must be refused and undone there, or a message would be lost.
    mutating func propose(_ outcome: SelectOutcomeView) -> Bool {
        if let decided { return decided == outcome.clause && self.outcome?.error == nil }
        guard !abandoned else { return false }
        decided = outcome.clause
        self.outcome = outcome
        return true
    }

    mutating func abandon() { abandoned = true }
}

/// The selects this host owns: it coordinates their waits (docs/selects.md). A wait offers each channel clause to
/// the channel's host, which asks back (`propose`) when the clause could fire; the first to ask wins, the others are
/// refused and withdrawn, so exactly one clause fires and nothing offered to the others is lost.
final class Selects: Sendable {
    private struct Entry {
        var run = SelectRun()
        var waiter: CheckedContinuation<SelectOutcomeView?, Never>?
    }
    private let runs = Mutex<[String: Entry]>([:])
    let hostID: String
    /// This host's API address, where channel hosts ask back.
    let api: String
    let ownerAddress: @Sendable (String) async throws -> String?

    init(hostID: String, api: String, ownerAddress: @escaping @Sendable (String) async throws -> String?) {
        self.hostID = hostID
        self.api = api
        self.ownerAddress = ownerAddress
    }

    /// How long a finished run's decision is remembered for channels that ask again.
    static let retention: Duration = .seconds(60)

    /// The clauses of a select element, checked: each names what is wrong with it.
    static func clauses(_ text: String) throws(APIError) -> [SelectClauseView] {
        let clauses: [SelectClauseView]
        if let problem = JSONLimits.depthProblem(text.utf8) { throw .badRequest("a select's clauses: \(problem)") }
        do {
            clauses = try JSONDecoder().decode([SelectClauseView].self, from: Data(text.utf8))
        } catch {
            throw .badRequest("a select's clauses are a JSON array of {\"op\": \"recv\"|\"send\"|\"wait\"|\"default\", \"chan\" (and \"created\") or \"proc\", \"message\"}: \(error)")
        }
        guard !clauses.isEmpty, clauses.count <= 64 else { throw .badRequest("a select has 1 to 64 clauses, not \(clauses.count)") }
        for (i, c) in clauses.enumerated() {
            switch c.op {
            case "recv", "send":
                guard let chan = c.chan, Names.validate(chan) == nil, Names.host(of: chan) != nil else {
                    throw .badRequest("clause \(i) (\(c.op)) needs \"chan\": a channel's path under a host")
                }
                if c.op == "send", c.message == nil, c.messageBase64.flatMap({ Data(base64Encoded: $0) }) == nil {
                    throw .badRequest("clause \(i) (send) needs \"message\" or \"message_base64\"")
                }
            case "wait":
                guard let proc = c.proc, Names.validate(proc) == nil else { throw .badRequest("clause \(i) (wait) needs \"proc\": a process's path") }
            case "default":
                guard clauses.firstIndex(where: { $0.op == "default" }) == i, clauses.lastIndex(where: { $0.op == "default" }) == i else {
                    throw .badRequest("a select has at most one default clause")
                }
            default:
                throw .badRequest("clause \(i): unknown op \(c.op.debugDescription) (recv, send, wait, default)")
            }
        }
        return clauses
    }

    /// Waits until exactly one clause of the select at `path` fires; answers it.
    func wait(_ path: String, clauses: [SelectClauseView]) async throws(APIError) -> SelectOutcomeView {
        let run = String(UInt64.random(in: 1...UInt64.max), radix: 16)
        runs.withLock { $0[run] = Entry() }
        defer {
            // Kept a while after the answer: a channel whose proposal's answer was lost asks again and must hear
            // the same.
            Task {
                try? await Task.sleep(for: Self.retention)
                runs.withLock { $0[run] = nil }
            }
        }
        var waits: [Task<Void, Never>] = []
        defer { for w in waits { w.cancel() } }
        // A clause whose channel is asking already could fire now: then `default` does not.
        var ready = false
        for (i, c) in clauses.enumerated() {
            switch c.op {
            case "recv", "send":
                let chan = c.chan!
                let message = c.op == "send" ? (c.messageBase64.flatMap { Data(base64Encoded: $0) }.map { [UInt8]($0) } ?? Array((c.message ?? "").utf8)) : nil
                switch await offer(chan, created: c.created, run: run, clause: i, select: path, message: message) {
                case .failure(let why):
                    var failed = SelectOutcomeView(clause: i, op: c.op)
                    failed.chan = chan
                    failed.error = why.description
                    _ = propose(run, failed)
                case .success(let asking):
                    ready = ready || asking
                }
            case "wait":
                let proc = c.proc!
                let api = self.api
                waits.append(Task {
                    var client = CircuitClient(endpoints: [api])
                    client.timeout = 7 * 24 * 3600
                    var fired = SelectOutcomeView(clause: i, op: "wait")
                    do {
                        fired.proc = try await client.wait(proc)
                    } catch {
                        if Task.isCancelled { return }
                        fired.error = "\(error)"
                    }
                    _ = self.propose(run, fired)
                })
            default:
                break
            }
        }
        if !ready, let d = clauses.firstIndex(where: { $0.op == "default" }) { _ = propose(run, SelectOutcomeView(clause: d, op: "default")) }
        let outcome: SelectOutcomeView? = await withTaskCancellationHandler {
            await withCheckedContinuation { (c: CheckedContinuation<SelectOutcomeView?, Never>) in
                let ready: SelectOutcomeView?? = runs.withLock { r in
                    if let outcome = r[run]?.run.outcome { return .some(outcome) }
                    if Task.isCancelled { return .some(nil) }
                    r[run]?.waiter = c
                    return .none
                }
                if let ready { c.resume(returning: ready) }
            }
        } onCancel: {
            let waiter = runs.withLock { r in
                r[run]?.run.abandon()
                defer { r[run]?.waiter = nil }
                return r[run]?.waiter
            }
            waiter?.resume(returning: nil)
        }
        // The other channel clauses' offers leave their channels (an offer left behind is refused when it asks),
        // and so does the chosen clause's when it failed: its offer may have reached its channel all the same.
        for (i, c) in clauses.enumerated() where (c.op == "recv" || c.op == "send") && (i != outcome?.clause || outcome?.error != nil) {
            let chan = c.chan!
            Task { await withdraw(chan, run: run) }
        }
        guard let outcome else {
            throw APIError(status: 499, code: "cancelled", message: "the select's client went away before a clause fired")
        }
        return outcome
    }

    /// A channel's host asks whether the clause fires. True for the first clause of the run only.
    func propose(_ run: String, _ outcome: SelectOutcomeView) -> Bool {
        let (accepted, waiter) = runs.withLock { r -> (Bool, CheckedContinuation<SelectOutcomeView?, Never>?) in
            guard var entry = r[run], entry.run.propose(outcome) else { return (false, nil) }
            let waiter = entry.waiter
            entry.waiter = nil
            r[run] = entry
            return (true, waiter)
        }
        waiter?.resume(returning: outcome)
        return accepted
    }

    /// Offers a clause to its channel's host: whether the channel is asking already, or why it cannot wait there.
    private func offer(
        _ chan: String, created: UInt64?, run: String, clause: Int, select: String, message: [UInt8]?
    ) async -> Result<Bool, OfferRefused> {
        let owner = Names.host(of: chan)!
        guard let address = try? await ownerAddress(owner) else { return .failure(OfferRefused("host \(owner), which owns \(chan), is not alive")) }
        let query = "run=\(run)&clause=\(clause)&coordinator=\(api)&select=\(select)&op=\(message == nil ? "recv" : "send")"
            + (created.map { "&created=\($0)" } ?? "")
        do {
            let answer = try await HTTPPool.shared(address).perform(.POST, "/v1/chan/offer\(chan)?\(query)", body: message, timeout: .seconds(10))
            guard answer.status == 200 else {
                let envelope = try? JSONDecoder().decode(ErrorEnvelope.self, from: Data(answer.body))
                return .failure(OfferRefused(envelope?.error.message ?? "HTTP \(answer.status) from \(address)"))
            }
            let asking = (try? JSONDecoder().decode([String: Bool].self, from: Data(answer.body)))?["proposing"] ?? false
            return .success(asking)
        } catch {
            return .failure(OfferRefused("cannot reach \(owner) at \(address): \(error)"))
        }
    }

    struct OfferRefused: Error, CustomStringConvertible {
        var description: String
        init(_ why: String) { description = why }
    }

    private func withdraw(_ chan: String, run: String) async {
        guard let owner = Names.host(of: chan), let address = try? await ownerAddress(owner) else { return }
        _ = try? await HTTPPool.shared(address).perform(.POST, "/v1/chan/withdraw\(chan)?run=\(run)", timeout: .seconds(10))
    }
}
