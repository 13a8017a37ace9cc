import NIOCore

/// One channel's buffer and waiters, with Go's semantics, as a pure value: each event returns what to do, and the
/// shell (`Channels`) carries it out (answers the waiting requests).
///
/// - Capacity 0 is a rendezvous: a send completes when a receiver takes its message.
/// - Messages leave in the order they were sent (FIFO over the buffer, then the waiting senders).
/// - A closed channel still delivers what it holds, then answers every receive with `closed`; a send on a closed
///   channel, and a second close, are errors.
/// - `trySend` and `tryReceive` never wait: they answer `wouldBlock` instead.
/// - A waiter that gives up (its client hung up, or its deadline passed) is cancelled and takes nothing with it: a
///   cancelled sender's message is never delivered.
/// - A channel that is removed (its name deleted, its host gone) fails every waiter with `gone`.
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
        case received(Waiter, [UInt8])
        case failed(Waiter, Failure)
    }

    let capacity: Int
    private(set) var closed = false
    private(set) var removed = false
    private var buffer = CircularBuffer<[UInt8]>()
    private var senders = CircularBuffer<(waiter: Waiter, message: [UInt8])>()
    private var receivers = CircularBuffer<Waiter>()
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

    mutating func send(_ waiter: Waiter, _ message: [UInt8], wait: Bool) -> [Action] {
        if removed { return [.failed(waiter, .gone)] }
        if closed { return [.failed(waiter, .closed)] }
        if let receiver = receivers.popFirst() {
            // A receiver waits only while the buffer is empty: hand the message over.
            sends += 1
            receives += 1
            return [.received(receiver, message), .sent(waiter)]
        }
        if buffer.count < capacity {
            sends += 1
            buffer.append(message)
            bufferedBytes += message.count
            return [.sent(waiter)]
        }
        guard wait else { return [.failed(waiter, .wouldBlock)] }
        senders.append((waiter, message))
        return []
    }

    mutating func receive(_ waiter: Waiter, wait: Bool) -> [Action] {
        if removed { return [.failed(waiter, .gone)] }
        if let message = buffer.popFirst() {
            bufferedBytes -= message.count
            receives += 1
            var actions: [Action] = [.received(waiter, message)]
            // Room in the buffer: the longest-waiting sender's message moves in, and its send is done.
            if let next = senders.popFirst() {
                buffer.append(next.message)
                bufferedBytes += next.message.count
                sends += 1
                actions.append(.sent(next.waiter))
            }
            return actions
        }
        if let next = senders.popFirst() {
            // Capacity 0: the rendezvous.
            sends += 1
            receives += 1
            return [.received(waiter, next.message), .sent(next.waiter)]
        }
        if closed { return [.failed(waiter, .closed)] }
        guard wait else { return [.failed(waiter, .wouldBlock)] }
        receivers.append(waiter)
        return []
    }

    /// Closes the channel: waiting receivers learn it is closed (the buffer is empty while they wait), waiting
    /// senders fail as a send on a closed channel does. Nil if it was already closed (or removed).
    mutating func close() -> [Action]? {
        guard !closed, !removed else { return nil }
        closed = true
        var actions = receivers.map { Action.failed($0, .closed) }
        actions += senders.map { Action.failed($0.waiter, .closed) }
        receivers.removeAll()
        senders.removeAll()
        return actions
    }

    /// The waiter gave up: it leaves the queue, with its message if it was sending. False if it was not waiting
    /// (it was already answered).
    mutating func cancel(_ waiter: Waiter) -> Bool {
        if let i = receivers.firstIndex(of: waiter) {
            receivers.remove(at: i)
            return true
        }
        if let i = senders.firstIndex(where: { $0.waiter == waiter }) {
            senders.remove(at: i)
            return true
        }
        return false
    }

    /// The channel's name is gone: every waiter fails, the buffer is dropped.
    mutating func remove() -> [Action] {
        removed = true
        let actions = receivers.map { Action.failed($0, .gone) } + senders.map { Action.failed($0.waiter, .gone) }
        receivers.removeAll()
        senders.removeAll()
        buffer.removeAll()
        bufferedBytes = 0
        return actions
    }
}
