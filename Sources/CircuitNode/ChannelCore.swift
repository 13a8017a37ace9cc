import NIOCore

/// One channel's buffer and waiters, with Go's semantics, as a pure value: each event returns what to do, and the
/// shell (`Channels`) carries it out (answers the waiting requests, asks selects).
///
/// - Capacity 0 is a rendezvous: a send completes when a receiver takes its message.
/// - Messages leave in the order they were sent (FIFO over the buffer, then the waiting senders).
/// - A closed channel still delivers what it holds, then answers every receive with `closed`; a send on a closed
///   channel, and a second close, are errors.
/// - `send(wait: false)` and `receive(wait: false)` never wait for a partner: they answer `wouldBlock` instead.
/// - A waiter that gives up (its client hung up, or its deadline passed) is cancelled and takes nothing with it: a
///   cancelled sender's message is never delivered.
/// - A channel that is removed (its name deleted, its host gone) fails every waiter with `gone`.
///
/// **Offers** are a select's clauses waiting here (docs/selects.md): they queue like waiters, but a match that
/// involves one is only proposed (`propose`), and the channel holds the match aside until the select answers
/// (`resolve`). Accepted, the match completes; refused, everything goes back where it was — the message to the head
/// of the buffer or its sender back to the head of the senders — so nothing is lost or reordered. One proposal at a
/// time: while one is out, other waiters queue and nothing else is matched. Two offers never match each other.
struct ChannelCore: Sendable {
    typealias Waiter = UInt64

    enum Failure: Error, Sendable, Hashable {
        case closed, wouldBlock, gone
        /// The shell's, not the core's: the host's budget for buffered bytes is spent.
        case bufferFull
    }

    enum Action: Sendable, Hashable {
        /// The send by this waiter is done: its message is buffered or was taken by a receiver.
        case sent(Waiter)
        /// This receiver gets this message.
        case received(Waiter, ChanMessage)
        case failed(Waiter, Failure)
        /// Ask the select behind `offer` whether it takes this match: `message` is what a receive offer would get
        /// (nil for a send offer). With `closed`, the channel is closed and empty: a receive offer fires as closed,
        /// and no answer is awaited.
        case propose(offer: Waiter, message: ChanMessage?, closed: Bool)
    }

    /// A match held aside while its select decides.
    private struct Proposal: Sendable {
        enum From: Sendable { case buffer, sender(Waiter) }
        enum To: Sendable { case receiver(Waiter), buffer }
        var offer: Waiter
        var message: ChanMessage
        var from: From
        var to: To
    }

    let capacity: Int
    private(set) var closed = false
    private(set) var removed = false
    private var buffer = CircularBuffer<ChanMessage>()
    private var senders = CircularBuffer<(waiter: Waiter, message: ChanMessage)>()
    private var receivers = CircularBuffer<Waiter>()
    private var offers = Set<Waiter>()
    private var proposal: Proposal?
    /// Plain waiters of the proposal out that gave up meanwhile (a try, or a client gone): if it is refused they
    /// leave (`wouldBlock`) instead of going back into the queue.
    private var leaving = Set<Waiter>()
    private(set) var sends: UInt64 = 0
    private(set) var receives: UInt64 = 0
    /// Bytes held: buffered messages (not those of waiting senders, which their requests hold).
    private(set) var bufferedBytes = 0

    init(capacity: Int) {
        self.capacity = capacity
    }

    var buffered: Int { buffer.count }
    var waitingSenders: Int { senders.count }
    var waitingReceivers: Int { receivers.count }
    var proposing: Bool { proposal != nil }

    // MARK: - Events

    mutating func send(_ waiter: Waiter, _ message: ChanMessage, wait: Bool) -> [Action] {
        if removed { return [.failed(waiter, .gone)] }
        if closed { return [.failed(waiter, .closed)] }
        senders.append((waiter, message))
        return settle(waiter, match(), wait: wait)
    }

    mutating func receive(_ waiter: Waiter, wait: Bool) -> [Action] {
        if removed { return [.failed(waiter, .gone)] }
        receivers.append(waiter)
        return settle(waiter, match(), wait: wait)
    }

    /// A select's send clause waits here with its message.
    mutating func offerSend(_ offer: Waiter, _ message: ChanMessage) -> [Action] {
        if removed { return [.failed(offer, .gone)] }
        if closed { return [.failed(offer, .closed)] }
        offers.insert(offer)
        senders.append((offer, message))
        return match()
    }

    /// A select's receive clause waits here.
    mutating func offerReceive(_ offer: Waiter) -> [Action] {
        if removed { return [.failed(offer, .gone)] }
        offers.insert(offer)
        receivers.append(offer)
        return match()
    }

    /// The select behind the proposal's offer answered: the match completes, or everything goes back.
    mutating func resolve(_ offer: Waiter, accepted: Bool) -> [Action] {
        guard let p = proposal, p.offer == offer else { return [] }
        proposal = nil
        offers.remove(offer)
        defer { leaving.removeAll() }
        var actions: [Action] = []
        if accepted {
            switch p.to {
            case .receiver(let r):
                receives += 1
                if r != offer { actions.append(.received(r, p.message)) }
            case .buffer:
                buffer.append(p.message)
                bufferedBytes += p.message.byteCount
            }
            if case .sender(let s) = p.from {
                sends += 1
                if s != offer { actions.append(.sent(s)) }
            }
        } else {
            switch p.from {
            case .buffer:
                buffer.prepend(p.message)
                bufferedBytes += p.message.byteCount
            case .sender(let s) where s != offer:
                if leaving.contains(s) { actions.append(.failed(s, .wouldBlock)) } else { senders.prepend((s, p.message)) }
            case .sender:
                break
            }
            if case .receiver(let r) = p.to, r != offer {
                if leaving.contains(r) { actions.append(.failed(r, .wouldBlock)) } else { receivers.prepend(r) }
            }
        }
        return actions + match()
    }

    /// Closes the channel: waiting senders fail as a send on a closed channel does; receivers get what is held, then
    /// learn it is closed. Nil if it was already closed (or removed).
    mutating func close() -> [Action]? {
        guard !closed, !removed else { return nil }
        closed = true
        return match()
    }

    /// The waiter (or offer) gave up: it leaves the queue, with its message if it was sending. False if it was not
    /// waiting (it was already answered, or it is part of a proposal, which its select's answer settles: accepted,
    /// it completes; refused, it leaves with `wouldBlock` rather than going back into the queue).
    mutating func cancel(_ waiter: Waiter) -> Bool {
        if let p = proposal {
            var parties: [Waiter] = []
            if case .sender(let s) = p.from { parties.append(s) }
            if case .receiver(let r) = p.to { parties.append(r) }
            if parties.contains(waiter), waiter != p.offer {
                leaving.insert(waiter)
                return false
            }
        }
        if let i = receivers.firstIndex(of: waiter) {
            receivers.remove(at: i)
            offers.remove(waiter)
            return true
        }
        if let i = senders.firstIndex(where: { $0.waiter == waiter }) {
            senders.remove(at: i)
            offers.remove(waiter)
            return true
        }
        return false
    }

    /// The channel's name is gone: every waiter fails, the buffer is dropped.
    mutating func remove() -> [Action] {
        removed = true
        var parties = Array(receivers) + senders.map(\.waiter)
        if let p = proposal {
            if case .sender(let s) = p.from { parties.append(s) }
            if case .receiver(let r) = p.to { parties.append(r) }
        }
        proposal = nil
        receivers.removeAll()
        senders.removeAll()
        buffer.removeAll()
        offers.removeAll()
        bufferedBytes = 0
        return Array(Set(parties)).sorted().map { .failed($0, .gone) }
    }

    // MARK: - Matching

    /// A plain waiter that could not be answered at once: with `wait`, it stays queued; without, it leaves with
    /// `wouldBlock` (or `closed`) — unless it is part of a proposal, which the select's answer settles.
    private mutating func settle(_ waiter: Waiter, _ actions: [Action], wait: Bool) -> [Action] {
        guard !wait, cancel(waiter) else { return actions }
        return actions + [.failed(waiter, closed && buffer.isEmpty && proposal == nil ? .closed : .wouldBlock)]
    }

    /// Matches waiters while no proposal is out.
    private mutating func match() -> [Action] {
        var actions: [Action] = []
        while proposal == nil {
            if step(&actions) { continue }
            break
        }
        if proposal == nil && closed {
            // Senders on a closed channel fail; receivers with nothing left to get learn it is closed.
            for s in senders {
                actions.append(.failed(s.waiter, .closed))  // an offer's select learns its send clause failed
                offers.remove(s.waiter)
            }
            senders.removeAll()
            if buffer.isEmpty {
                for r in receivers {
                    if offers.remove(r) != nil {
                        actions.append(.propose(offer: r, message: nil, closed: true))
                    } else {
                        actions.append(.failed(r, .closed))
                    }
                }
                receivers.removeAll()
            }
        }
        return actions
    }

    /// One match, if any: the first receiver that has a partner (the buffer's head, else the first sender it may
    /// pair with), else the first sender into room in the buffer.
    private mutating func step(_ actions: inout [Action]) -> Bool {
        for (ri, r) in receivers.enumerated() {
            let receiverIsOffer = offers.contains(r)
            if let message = buffer.first {
                receivers.remove(at: receivers.index(receivers.startIndex, offsetBy: ri))
                buffer.removeFirst()
                bufferedBytes -= message.byteCount
                if receiverIsOffer {
                    proposal = Proposal(offer: r, message: message, from: .buffer, to: .receiver(r))
                    actions.append(.propose(offer: r, message: message, closed: false))
                } else {
                    receives += 1
                    actions.append(.received(r, message))
                }
                return true
            }
            guard let si = senders.firstIndex(where: { !(receiverIsOffer && offers.contains($0.waiter)) }) else { continue }
            let s = senders.remove(at: si)
            receivers.remove(at: receivers.index(receivers.startIndex, offsetBy: ri))
            if receiverIsOffer || offers.contains(s.waiter) {
                let offer = receiverIsOffer ? r : s.waiter
                proposal = Proposal(offer: offer, message: s.message, from: .sender(s.waiter), to: .receiver(r))
                actions.append(.propose(offer: offer, message: receiverIsOffer ? s.message : nil, closed: false))
            } else {
                sends += 1
                receives += 1
                actions.append(.received(r, s.message))
                actions.append(.sent(s.waiter))
            }
            return true
        }
        if buffer.count < capacity, !closed, let s = senders.first {
            senders.removeFirst()
            if offers.contains(s.waiter) {
                proposal = Proposal(offer: s.waiter, message: s.message, from: .sender(s.waiter), to: .buffer)
                actions.append(.propose(offer: s.waiter, message: nil, closed: false))
            } else {
                buffer.append(s.message)
                bufferedBytes += s.message.byteCount
                sends += 1
                actions.append(.sent(s.waiter))
            }
            return true
        }
        return false
    }
}
