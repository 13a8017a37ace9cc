import CircuitAPI
import CircuitClient
import CircuitStateMachine
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import NIOHTTP1
import Synchronization

/// The channels this host owns (`/X<this host>/...` elements of kind `chan`): their buffers and waiters live here,
/// and every send and receive comes here point-to-point; only the names go through Raft.
///
/// A channel is taken on at its first use here: its element is read through this host's own API (linearizable), so
/// a send that follows an acknowledged create finds it. The host runtime's watch tells it when an element is
/// removed: its waiters fail with `gone` and its buffer is dropped.
///
/// Bounded: a message is at most `maxMessageBytes`, and the buffers of all channels on this host hold at most
/// `maxBufferedBytes` (a send that would pass it is refused, 507 `buffers_full`). A waiting sender's message is held by
/// its request alone.
final class Channels: Sendable {
    typealias Waiter = ChannelCore.Waiter

    enum Outcome: Sendable {
        case sent
        case received(ChanMessage)
        case failed(ChannelCore.Failure)
        case cancelled
    }

    /// A select's clause waiting in a channel here (docs/selects.md): whom to ask when it could fire.
    struct Offer: Sendable, Hashable {
        /// The API address of the host that runs the select.
        var coordinator: String
        var select: String
        var run: String
        var clause: Int
        var receiving: Bool
    }

    private struct Entry {
        var createRevision: UInt64
        /// A membership subscription: only the host's feed sends to it.
        var subscription = false
        var core: ChannelCore
        var waiting: [Waiter: CheckedContinuation<Outcome, Never>] = [:]
        var offers: [Waiter: Offer] = [:]
    }

    /// What a change to a channel leaves to do outside the lock: requests to answer, selects to ask.
    private struct Settled {
        var resumes: [(CheckedContinuation<Outcome, Never>, Outcome)] = []
        var asks: [(waiter: Waiter, offer: Offer, message: ChanMessage?, closed: Bool, failure: ChannelCore.Failure?)] = []
    }

    private struct State {
        var entries: [String: Entry] = [:]
        var nextWaiter: Waiter = 1
        var bufferedBytes = 0
        /// Raised at every removal: a first use that read the element while one happened reads it again.
        var removals: UInt64 = 0
    }

    private let state = Mutex(State())
    let maxMessageBytes: Int
    let maxBufferedBytes: Int
    /// The events a subscription holds for its readers; more are dropped (and logged by the feed).
    static let subscriptionCapacity = 10_000
    /// The element at a path, read linearizably; nil if there is none.
    private let lookup: @Sendable (String) async throws -> ElementView?

    /// A live host's client address (nil: it is not alive).
    private let ownerAddress: @Sendable (String) async throws -> String?
    /// Told of every message of `Allocator.largeData` bytes or more sent into a channel here.
    private let largeMessage: @Sendable () -> Void

    init(
        maxMessageBytes: Int, maxBufferedBytes: Int, lookup: @escaping @Sendable (String) async throws -> ElementView?,
        ownerAddress: @escaping @Sendable (String) async throws -> String? = { _ in nil },
        largeMessage: @escaping @Sendable () -> Void = Allocator.noteLargeData
    ) {
        self.maxMessageBytes = maxMessageBytes
        self.maxBufferedBytes = maxBufferedBytes
        self.lookup = lookup
        self.ownerAddress = ownerAddress
        self.largeMessage = largeMessage
    }

    // MARK: - Operations

    /// Sends `message`; waits (unless `wait` is false) until it is buffered or, at capacity 0, received.
    ///
    /// `created`, in every operation: the create revision of the channel the client means, if it knows it. A
    /// channel here from before it (removed and made again, and the watch has not told this host yet) is dropped
    /// as its removal would drop it, so the message goes to the channel the client means; a channel here from after
    /// it means the client's channel is gone (410).
    func send(_ path: String, _ message: ChanMessage, wait: Bool, created: UInt64? = nil) async throws(APIError) -> ChanStatView {
        try await sendOne(path, message, wait: wait, created: created)
        return try stat(local: path)
    }

    /// The same, answering nothing (for a stream of sends).
    func sendOne(_ path: String, _ message: ChanMessage, wait: Bool, created: UInt64? = nil) async throws(APIError) {
        guard message.byteCount <= maxMessageBytes else { throw Self.tooLarge(maxMessageBytes) }
        // However it arrived (in reads of any size): the allocator keeps free memory for the next large one.
        if message.byteCount >= Allocator.largeData { largeMessage() }
        try await ensureWritable(path, created: created)
        let outcome = await perform(path) { hostBuffered, core, waiter in
            if core.waitingReceivers == 0, core.buffered < core.capacity, hostBuffered + message.byteCount > maxBufferedBytes {
                return nil
            }
            return core.send(waiter, message, wait: wait)
        }
        switch outcome {
        case .sent: return
        case .cancelled: throw APIError(status: 499, code: "cancelled", message: "the send's client went away")
        case .received: throw APIError(status: 500, code: "internal", message: "a send was answered as a receive")
        case .failed(let f): throw Self.error(f, path, sending: true)
        }
    }

    /// Receives the next message; waits (unless `wait` is false) until there is one or the channel is closed.
    func receive(_ path: String, wait: Bool, created: UInt64? = nil) async throws(APIError) -> ChanMessage {
        try await ensure(path, created: created)
        let outcome = await perform(path) { _, core, waiter in core.receive(waiter, wait: wait) }
        switch outcome {
        case .received(let message): return message
        case .cancelled: throw APIError(status: 499, code: "cancelled", message: "the receive's client went away")
        case .sent: throw APIError(status: 500, code: "internal", message: "a receive was answered as a send")
        case .failed(let f): throw Self.error(f, path, sending: false)
        }
    }

    /// Closes the channel: what it holds is still delivered, then receives answer `closed`.
    func close(_ path: String, created: UInt64? = nil) async throws(APIError) -> ChanStatView {
        try await ensureWritable(path, created: created)
        var closedNow = false
        let settled = mutate(path) { entry, _ in
            guard let actions = entry.core.close() else { return Settled() }
            closedNow = true
            return Self.settle(actions, &entry)
        }
        guard let settled, closedNow else { throw APIError(status: 409, code: "closed", message: "\(path) is already closed") }
        finish(settled, path)
        return try stat(local: path)
    }

    func stat(_ path: String, created: UInt64? = nil) async throws(APIError) -> ChanStatView {
        try await ensure(path, created: created)
        return try stat(local: path)
    }

    // MARK: - Selects' offers

    /// A select's clause waits here: a receive (`message` nil) or a send of `message`. Answers at once, and whether
    /// the select is being asked already (the clause could fire at once); else it is asked when the clause could.
    /// `created`: as in `send`.
    func offer(_ path: String, _ offer: Offer, sending message: ChanMessage?, created: UInt64? = nil) async throws(APIError) -> Bool {
        if let message, message.byteCount > maxMessageBytes { throw Self.tooLarge(maxMessageBytes) }
        if message != nil { try await ensureWritable(path, created: created) } else { try await ensure(path, created: created) }
        let waiter = state.withLock { s in
            defer { s.nextWaiter += 1 }
            return s.nextWaiter
        }
        let settled = mutate(path) { entry, _ in
            entry.offers[waiter] = offer
            let actions = message.map { entry.core.offerSend(waiter, $0) } ?? entry.core.offerReceive(waiter)
            return Self.settle(actions, &entry)
        }
        guard let settled else { throw Self.error(.gone, path, sending: message != nil) }
        finish(settled, path)
        return settled.asks.contains { $0.waiter == waiter }
    }

    /// The select run `run` has decided: its other offers here leave.
    func withdraw(_ path: String, run: String) {
        let settled = mutate(path) { entry, _ in
            for (waiter, offer) in entry.offers where offer.run == run && entry.core.cancel(waiter) {
                entry.offers[waiter] = nil
            }
            return Settled()
        }
        if let settled { finish(settled, path) }
    }

    /// Asks the select whether it takes the match its offer is in; then completes or undoes it.
    private func ask(_ path: String, _ waiter: Waiter, _ offer: Offer, message: ChanMessage?, closed: Bool, failure: ChannelCore.Failure?) async {
        var query = "run=\(offer.run)&clause=\(offer.clause)&chan=\(path)&op=\(offer.receiving ? "recv" : "send")"
        if closed { query += "&closed=1" }
        if let failure { query += "&failure=\(failure == .closed ? "closed" : "gone")" }
        // Asked again until it answers (the select's host remembers its decision for a minute): an answer lost on
        // the way must not be taken for a refusal, or a message the select took would also stay here.
        var accepted = false
        let giveUp = ContinuousClock.now + Selects.retention
        while true {
            if let answer = try? await HTTPPool.shared(offer.coordinator).perform(
                .POST, "/v1/select/propose\(offer.select)?\(query)", body: message.map { Array(buffer: $0.gathered) }, timeout: .seconds(5)),
                answer.status == 200
            {
                accepted = (try? JSONDecoder().decode([String: Bool].self, from: Data(answer.body)))?["commit"] ?? false
                break
            }
            // Refused once its host is no longer alive (its session ended: its runs ended with it), or after a minute.
            var gone = false
            if let host = Names.host(of: offer.select) {
                do { gone = try await ownerAddress(host) == nil } catch {}  // not known: ask again
            }
            if gone { break }
            guard ContinuousClock.now < giveUp else { break }
            try? await Task.sleep(for: .milliseconds(200))
        }
        // A closed or failed clause was already taken out of the queue: there is nothing to complete or undo.
        guard !closed, failure == nil else { return }
        let settled = mutate(path) { entry, _ in
            entry.offers[waiter] = nil
            return Self.settle(entry.core.resolve(waiter, accepted: accepted), &entry)
        }
        if let settled { finish(settled, path) }
    }

    // MARK: - What the runtime's watch says

    /// From a subscription's feed: one event for its readers. False if the subscription holds all it can (the event
    /// is dropped).
    func deliver(_ path: String, createRevision: UInt64, _ event: [UInt8]) -> Bool {
        // An older element's entry still here (the watch has not told of its removal yet) goes first.
        if state.withLock({ $0.entries[path].map { $0.createRevision < createRevision } ?? false }) {
            removed(path, at: createRevision)
        }
        state.withLock { s in
            if s.entries[path] == nil {
                s.entries[path] = Entry(
                    createRevision: createRevision, subscription: true, core: ChannelCore(capacity: Self.subscriptionCapacity))
            }
        }
        var taken = false
        let settled = mutate(path) { entry, _ in
            // Held while there is room, counting events queued behind a proposal out (waiter 0 has no request).
            guard entry.createRevision == createRevision,
                entry.core.buffered + entry.core.waitingSenders < entry.core.capacity
            else { return Settled() }
            taken = true
            return Self.settle(entry.core.send(0, ChanMessage(ByteBuffer(bytes: event)), wait: true), &entry)
        }
        if let settled { finish(settled, path) }
        return taken
    }

    /// The element at `path` was removed at `revision`: its waiters fail with `gone`, its buffer goes. A channel here
    /// created at or after `revision` is a newer element at the same path, taken on before a lagging watch told of the
    /// older one's removal: it stays. Nil: whatever is at the path goes.
    func removed(_ path: String, at revision: UInt64? = nil) {
        let settled = state.withLock { s -> Settled in
            s.removals += 1
            guard let entry = s.entries[path], revision.map({ entry.createRevision < $0 }) ?? true,
                var entry = s.entries.removeValue(forKey: path)
            else { return Settled() }
            s.bufferedBytes -= entry.core.bufferedBytes
            return Self.settle(entry.core.remove(), &entry)
        }
        finish(settled, path)
    }

    /// After a scan of the host's subtree as of `listedAt`: the channels not present (path and create revision) were
    /// removed. One created after `listedAt` (taken on meanwhile) is left to the watch that follows the scan.
    func keep(only present: [String: UInt64], listedAt: UInt64) {
        let gone = state.withLock { s in
            s.entries.filter { $0.value.createRevision <= listedAt && present[$0.key] != $0.value.createRevision }.map(\.key)
        }
        for path in gone { removed(path, at: listedAt + 1) }
    }

    /// The daemon stops: every channel's waiters fail.
    func removeAll() {
        for path in state.withLock({ Array($0.entries.keys) }) { removed(path) }
    }

    // MARK: - The shell

    /// The same, for an operation that sends or closes: a subscription is sent to by its host only.
    private func ensureWritable(_ path: String, created: UInt64? = nil) async throws(APIError) {
        try await ensure(path, created: created)
        if state.withLock({ $0.entries[path]?.subscription == true }) { throw Self.readOnly(path) }
    }

    /// Takes the channel on at its first use here: reads its element (again if a removal happened meanwhile). With
    /// `created` (see `send`), first drops a channel from before it, and refuses if the one here is from after it.
    private func ensure(_ path: String, created: UInt64? = nil) async throws(APIError) {
        // The channel here is older than the one meant: dropped as its removal would drop it, once the cluster says
        // it was removed (the element at the path is another, or none). A revision that names no channel (a
        // mistake, kept in a select's clause and asked again at every run) must not wipe the live one: then the
        // check below answers `gone`.
        if let created, let held = state.withLock({ $0.entries[path].map(\.createRevision) }), held < created,
            try await currentRevision(path) != held
        {
            removed(path, at: held + 1)
        }
        try await takeOn(path)
        if let created, let have = state.withLock({ $0.entries[path]?.createRevision }), have != created {
            throw APIError(
                status: 410, code: "gone",
                message: "\(path) was removed: the channel there now was created at revision \(have), not \(created)")
        }
    }

    /// The create revision of the element at `path` as the cluster has it now; nil if there is none.
    private func currentRevision(_ path: String) async throws(APIError) -> UInt64? {
        try await element(path)?.createRevision
    }

    /// The element at `path` as the cluster has it now; nil if there is none.
    private func element(_ path: String) async throws(APIError) -> ElementView? {
        do {
            return try await lookup(path)
        } catch let error as APIError {
            throw error
        } catch {
            throw APIError(status: 503, code: "unavailable", message: "cannot read \(path) from the cluster: \(error)")
        }
    }

    private func takeOn(_ path: String) async throws(APIError) {
        for _ in 0..<5 {
            let removals: UInt64? = state.withLock { $0.entries[path] != nil ? nil : $0.removals }
            guard let removals else { return }
            guard let view = try await element(path) else { throw APIError.from(.notFound(path: path)) }
            let subscription = view.kind == "subscription"
            guard view.kind == "chan" || subscription else {
                throw APIError.from(.wrongKind(path: path, expected: "chan", actual: view.kind))
            }
            guard let created = view.createRevision else {
                throw APIError(status: 500, code: "internal", message: "\(path) is a \(view.kind) without a create revision")
            }
            let capacity = subscription ? Self.subscriptionCapacity : Int(view.capacity ?? 0)
            let taken = state.withLock { s in
                guard s.removals == removals else { return false }
                if s.entries[path] == nil {
                    s.entries[path] = Entry(createRevision: created, subscription: subscription, core: ChannelCore(capacity: capacity))
                }
                return true
            }
            if taken { return }
        }
        throw APIError(status: 503, code: "unavailable", message: "\(path) keeps being removed and created: try again")
    }

    /// Runs one event on the channel as a waiter, and waits for its answer. A task cancelled while waiting (its
    /// client hung up) leaves the queue and takes nothing with it.
    private func perform(
        _ path: String, _ event: (_ hostBuffered: Int, inout ChannelCore, Waiter) -> [ChannelCore.Action]?
    ) async -> Outcome {
        let waiter = state.withLock { s in
            defer { s.nextWaiter += 1 }
            return s.nextWaiter
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Outcome, Never>) in
                let settled = mutate(path) { entry, hostBuffered in
                    guard let actions = event(hostBuffered, &entry.core, waiter) else {
                        return Settled(resumes: [(continuation, .failed(.bufferFull))])
                    }
                    entry.waiting[waiter] = continuation
                    var out = Self.settle(actions, &entry)
                    // Cancelled before it was queued: the handler below found nothing to cancel.
                    if Task.isCancelled, entry.core.cancel(waiter), let c = entry.waiting.removeValue(forKey: waiter) {
                        out.resumes.append((c, .cancelled))
                    }
                    return out
                }
                finish(settled ?? Settled(resumes: [(continuation, .failed(.gone))]), path)
            }
        } onCancel: {
            let cancelled = state.withLock { s -> CheckedContinuation<Outcome, Never>? in
                guard var entry = s.entries.removeValue(forKey: path) else { return nil }
                defer { s.entries[path] = entry }
                guard entry.core.cancel(waiter) else { return nil }
                return entry.waiting.removeValue(forKey: waiter)
            }
            cancelled?.resume(returning: .cancelled)
        }
    }

    /// Changes the channel at `path` under the lock, out of the table meanwhile (its buffers are not copied),
    /// keeping the host's count of buffered bytes. Nil if there is no such channel here.
    /// `body` also gets the bytes all of this host's channels hold, read under the same lock.
    private func mutate(_ path: String, _ body: (inout Entry, _ hostBuffered: Int) -> Settled) -> Settled? {
        state.withLock { s in
            guard var entry = s.entries.removeValue(forKey: path) else { return nil }
            defer { s.entries[path] = entry }
            let before = entry.core.bufferedBytes
            let settled = body(&entry, s.bufferedBytes)
            s.bufferedBytes += entry.core.bufferedBytes - before
            return settled
        }
    }

    /// Answers the requests and asks the selects a change left to do.
    private func finish(_ settled: Settled, _ path: String) {
        for (c, o) in settled.resumes { c.resume(returning: o) }
        for a in settled.asks {
            Task { await ask(path, a.waiter, a.offer, message: a.message, closed: a.closed, failure: a.failure) }
        }
    }

    /// The requests the actions answer, taken out of the entry, and the selects to ask.
    private static func settle(_ actions: [ChannelCore.Action], _ entry: inout Entry) -> Settled {
        var out = Settled()
        for action in actions {
            switch action {
            case .sent(let w): if let c = entry.waiting.removeValue(forKey: w) { out.resumes.append((c, .sent)) }
            case .received(let w, let m): if let c = entry.waiting.removeValue(forKey: w) { out.resumes.append((c, .received(m))) }
            case .failed(let w, let f):
                if let c = entry.waiting.removeValue(forKey: w) { out.resumes.append((c, .failed(f))) }
                if let offer = entry.offers.removeValue(forKey: w) { out.asks.append((w, offer, nil, false, f)) }
            case .propose(let w, let m, let closed):
                guard let offer = closed ? entry.offers.removeValue(forKey: w) : entry.offers[w] else { continue }
                out.asks.append((w, offer, m, closed, nil))
            }
        }
        return out
    }

    private func stat(local path: String) throws(APIError) -> ChanStatView {
        guard let view = state.withLock({ s in s.entries[path].map { Self.view(path, $0.core) } }) else {
            throw Self.error(.gone, path, sending: false)
        }
        return view
    }

    private static func view(_ path: String, _ c: ChannelCore) -> ChanStatView {
        ChanStatView(
            path: path, capacity: c.capacity, closed: c.closed, buffered: c.buffered, sends: c.sends, receives: c.receives,
            waitingSenders: c.waitingSenders, waitingReceivers: c.waitingReceivers)
    }

    static func readOnly(_ path: String) -> APIError {
        APIError(status: 409, code: "wrong_kind", message: "\(path) is a subscription: its host sends to it, clients only receive")
    }

    static func tooLarge(_ limit: Int) -> APIError {
        APIError(status: 413, code: "too_large", message: "a message is at most \(limit) bytes (max-message-bytes)")
    }

    private static func error(_ failure: ChannelCore.Failure, _ path: String, sending: Bool) -> APIError {
        switch failure {
        case .closed:
            return sending
                ? APIError(status: 409, code: "closed", message: "send on a closed channel: \(path)")
                : APIError(status: 409, code: "closed", message: "\(path) is closed and holds nothing more")
        case .wouldBlock:
            return APIError(
                status: 409, code: "would_block",
                message: sending ? "\(path) has no room and no waiting receiver" : "\(path) holds no message and no sender waits")
        case .gone:
            return APIError(status: 410, code: "gone", message: "\(path) was removed (or its host left) while this waited")
        case .bufferFull:
            return APIError(status: 507, code: "buffers_full", message: "this host's channel buffers are full (max-buffered-bytes)")
        }
    }
}

/// The channel API of every node and worker (`/v1/chan/{send,recv,close,stat}/PATH`, and `offer` and `withdraw`
/// between hosts for selects). A channel's operations are served by its owning host; any other node answers 307 with
/// the owner's address, so the messages never pass through a third host.
struct ChannelRoutes: RouterMiddleware {
    typealias Context = APIContext
    let hostID: String
    let channels: Channels
    /// A live host's client address.
    let ownerAddress: @Sendable (String) async throws -> String?

    func handle(
        _ request: Request, context: Context, next: (Request, Context) async throws -> Response
    ) async throws -> Response {
        guard let (op, path) = try OwnerRouting.operation(request, under: "/v1/chan/") else { return try await next(request, context) }
        let expected: HTTPRequest.Method = op == "stat" ? .get : .post
        guard ["send", "recv", "close", "stat", "offer", "withdraw"].contains(op) else {
            throw APIError(status: 404, code: "not_found", message: "no such channel operation \(op.debugDescription) (send, recv, close, stat, offer, withdraw)")
        }
        guard request.method == expected else {
            throw APIError(status: 405, code: "method_not_allowed", message: "\(op) is \(expected.rawValue) /v1/chan/\(op)/PATH")
        }
        if let error = Names.validate(path) { throw APIError.from(error) }
        guard let owner = Names.host(of: path) else {
            throw APIError.badRequest("\(path) is not under a host: a channel lives on the host that owns it")
        }
        let wait = request.uri.queryParameters.get("try") != "1"
        // The create revision of the channel the client (or a select's clause) means, if it knows it (see
        // `Channels.send`).
        var created: UInt64? = nil
        if let raw = request.uri.queryParameters.get("created") {
            guard let revision = UInt64(raw) else { throw APIError.badRequest("created=\(raw) is not a revision") }
            created = revision
        }
        if op == "offer" || op == "withdraw" {
            // Between hosts, for selects: never forwarded.
            guard owner == hostID else {
                throw APIError(status: 503, code: "wrong_host", message: "\(path) belongs to \(owner), not to this host (\(hostID))")
            }
            let q = request.uri.queryParameters
            guard let run = q.get("run").map({ String($0) }) else { throw APIError.badRequest("\(op) needs run") }
            if op == "withdraw" {
                channels.withdraw(path, run: run)
                return try json(["withdrawn": true])
            }
            guard let clause = q.get("clause").flatMap({ Int($0) }), let coordinator = q.get("coordinator").map({ String($0) }),
                let select = q.get("select").map({ String($0) }), let kind = q.get("op"), kind == "recv" || kind == "send"
            else { throw APIError.badRequest("offer needs run, clause, coordinator, select and op (recv or send)") }
            let body = try await OwnerRouting.collect(request.body, upTo: channels.maxMessageBytes)
            let offer = Channels.Offer(coordinator: coordinator, select: select, run: run, clause: clause, receiving: kind == "recv")
            let asking = try await channels.offer(path, offer, sending: kind == "send" ? ChanMessage(body) : nil, created: created)
            return try json(["offered": true, "proposing": asking])
        }
        // Point to point: any other node names the owning host (307), and the client asks it.
        if owner != hostID { return try await OwnerRouting.redirect(request, owner: owner, path: path, ownerAddress: ownerAddress) }
        switch op {
        case "send" where request.uri.queryParameters.get("stream") == "1":
            return try await OwnerRouting.whileConnected(request, if: true) { body in
                try json(["sent": try await sendStream(body, to: path, created: created)])
            }
        case "recv" where request.uri.queryParameters.get("stream") != nil:
            guard let count = request.uri.queryParameters.get("stream").flatMap({ Int($0) }), (1...1_000_000).contains(count) else {
                throw APIError.badRequest("stream is the number of messages to receive, 1 to 1,000,000")
            }
            // What fails at once (no such channel, another kind, another channel at the path) is answered as an
            // error; what fails after the stream began ends it with a failure frame.
            _ = try await channels.stat(path, created: created)
            return receiveStream(request, from: path, count: count, created: created)
        case "send":
            return try await OwnerRouting.whileConnected(request, if: wait) { body in
                let message = try await OwnerRouting.collect(body, upTo: channels.maxMessageBytes)
                return try json(try await channels.send(path, ChanMessage(message), wait: wait, created: created))
            }
        case "recv":
            return try await OwnerRouting.whileConnected(request, if: wait) { _ in
                let message = try await channels.receive(path, wait: wait, created: created)
                return Response(
                    status: .ok, headers: [.contentType: "application/octet-stream"],
                    body: .init(byteBuffer: message.gathered))
            }
        case "close":
            return try json(try await channels.close(path, created: created))
        default:
            return try json(try await channels.stat(path, created: created))
        }
    }

    /// A stream of sends: the body is messages, each a 4-byte big-endian length and its bytes, sent in order, each
    /// after the last was taken (a waiting send holds back the rest of the body: back-pressure to the sender). A large
    /// message is sent as the slices of the body's chunks it arrived in, not copied: within one chunk, one slice; over
    /// several, one slice of each. A small one (or a small slice of a large one) is copied out, so that it never holds
    /// a whole read buffer (up to 1 MiB) alive.
    private func sendStream(_ body: RequestBody, to path: String, created: UInt64?) async throws -> Int {
        var frames = MessageFrameReader(limit: channels.maxMessageBytes)
        var sent = 0
        func kept(_ piece: ByteBuffer) -> ByteBuffer {
            piece.readableBytes < MessageFrameWriter.largeMessage ? ByteBuffer(bytes: piece.readableBytesView) : piece
        }
        for try await var chunk in body {
            do {
                while let pieces = try frames.next(&chunk) {
                    let message = ChanMessage(pieces: pieces)
                    try await channels.sendOne(
                        path,
                        message.byteCount < MessageFrameWriter.largeMessage ? ChanMessage(message.copied) : ChanMessage(pieces: pieces.map(kept)),
                        wait: true, created: created)
                    sent += 1
                }
            } catch is MessageFrameReader.TooLarge {
                throw Channels.tooLarge(channels.maxMessageBytes)
            }
        }
        guard frames.unfinished == 0 else {
            throw APIError.badRequest("the stream of messages ends inside a message (\(frames.unfinished) bytes missing)")
        }
        return sent
    }

    /// A stream of receives: up to `count` messages, each framed as in a stream of sends, written as they come (those
    /// already there together); it ends early when the channel is closed and empty, and with a failure frame
    /// (`MessageFrameWriter.appendFailure`) when a receive fails otherwise. A client that hangs up ends it.
    private func receiveStream(_ request: Request, from path: String, count: Int, created: UInt64?) -> Response {
        let body = ResponseBody { writer in
            do {
                try await request.body.consumeWithCancellationOnInboundClose { _ in
                    var received = 0
                    // What goes out in the next write: whole buffers (large messages' pieces, not copied) and, behind
                    // them, small messages framed together.
                    var frames = MessageFrameWriter()
                    func flush() async throws {
                        let parts = frames.take()
                        if !parts.isEmpty { try await writer.write(contentsOf: parts) }
                    }
                    receiving: while received < count {
                        // The first waits; those already there come along without waiting, up to a MiB a write.
                        var wait = true
                        while received < count, frames.bytes < 1 << 20 {
                            let message: ChanMessage
                            do throws(APIError) {
                                message = try await channels.receive(path, wait: wait, created: created)
                            } catch {
                                if error.code == "would_block" { break }
                                // Closed and empty: the stream's end, with fewer messages. Cancelled: the client
                                // hung up, or this node is stopping. Anything else (the channel removed, or its host
                                // leaving) is the stream's failure.
                                if error.code != "closed", error.code != "cancelled" { frames.appendFailure(StreamFailure(error)) }
                                try await flush()
                                break receiving
                            }
                            frames.append(length: message.byteCount) { message.forEachPiece($0) }
                            received += 1
                            wait = false
                        }
                        try await flush()
                    }
                }
            } catch is CancellationError {
                return
            }
            try await writer.finish(nil)
        }
        return Response(status: .ok, headers: [.contentType: "application/octet-stream", .connection: "close"], body: body)
    }

}
