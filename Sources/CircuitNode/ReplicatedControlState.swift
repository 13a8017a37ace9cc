import CircuitRaft
import CircuitStateMachine
import Synchronization

/// The control state as Raft's state machine on one node, and the watches that read its changes.
///
/// Raft's driver thread applies committed entries here in log order; readers take the state under the same lock, so
/// a read sees whole commands only. Watchers get every change under their prefix after the revision they asked for,
/// in order, none missed: first from the retained history, then as entries are applied. A watcher that does not keep
/// up (more than `watchBuffer` undelivered events) is ended with `WatchError.compacted`, naming the revision to
/// resume from, instead of being silently skipped.
public final class ReplicatedControlState: RaftStateMachine, Sendable {
    public typealias WatchStream = AsyncThrowingStream<WatchEvent, any Error>

    private struct Watcher {
        let scope: PathPrefix
        /// The last revision delivered (or skipped as not matching).
        var delivered: Revision
        let continuation: WatchStream.Continuation
    }

    private struct Inner {
        var state: ControlState
        var watchers: [UInt64: Watcher] = [:]
        var nextWatcher: UInt64 = 1
        /// Set by `endWatches`: the node is stopping, and a new watch ends at once.
        var watchesEnded = false
    }

    private let inner: Mutex<Inner>
    /// Undelivered events a watcher may have before it is ended as too slow.
    public let watchBuffer: Int

    public init(historyLimit: Int = 100_000, watchBuffer: Int = 10_000) {
        self.inner = Mutex(Inner(state: ControlState(historyLimit: historyLimit)))
        self.watchBuffer = watchBuffer
    }

    // MARK: - RaftStateMachine (the driver's thread)

    public func apply(_ entry: Entry) -> [UInt8] { apply(entry, answered: true) }

    public func apply(_ entry: Entry, answered: Bool) -> [UInt8] {
        let result: CommandResult
        var ended: [(WatchStream.Continuation, Revision)] = []
        do {
            let command = try Command(decoding: entry.data)
            result = inner.withLock { inner in
                let outcome = inner.state.apply(command, index: entry.index)
                if !outcome.events.isEmpty { ended = Self.deliver(outcome.events, in: &inner) }
                return outcome.result
            }
        } catch {
            // A command this version cannot read changes nothing, on every replica alike.
            result = .failed(error)
        }
        for (continuation, revision) in ended { continuation.finish(throwing: WatchError.compacted(resumeFrom: revision)) }
        return answered ? result.encoded : []
    }

    public func snapshot() -> @Sendable () throws -> [UInt8] {
        let copy = inner.withLock { $0.state }
        return { copy.snapshot() }
    }

    public func restore(_ payload: [UInt8]) throws {
        let restored = try ControlState(restoring: payload)
        var ended: [(WatchStream.Continuation, Revision)] = []
        inner.withLock { inner in
            inner.state = restored
            // Each watcher continues from what it had, if the restored history still holds it.
            for (id, watcher) in inner.watchers {
                switch restored.events(after: watcher.delivered, prefix: watcher.scope.prefix) {
                case .success(let events):
                    for event in events where !Self.yield(event, to: id, in: &inner) {
                        ended.append((watcher.continuation, event.revision))
                        break
                    }
                    // A watch opened from a revision beyond the snapshot still starts there.
                    inner.watchers[id]?.delivered = max(watcher.delivered, restored.revision)
                case .failure(.compacted(let from)):
                    inner.watchers[id] = nil
                    ended.append((watcher.continuation, from))
                }
            }
        }
        for (continuation, revision) in ended { continuation.finish(throwing: WatchError.compacted(resumeFrom: revision)) }
    }

    // MARK: - Reading

    /// Runs `body` on the state as of the last applied command.
    public func read<T>(_ body: (ControlState) throws -> T) rethrows -> T {
        try inner.withLock { try body($0.state) }
    }

    /// Every change under `prefix` after revision `after`, in order, then each new one as it is applied, until the
    /// stream is dropped. Throws `WatchError.compacted` at once if the history no longer reaches back to `after`.
    public func watch(prefix: String, after revision: Revision) throws(WatchError) -> WatchStream {
        let (stream, continuation) = WatchStream.makeStream(bufferingPolicy: .bufferingOldest(watchBuffer))
        let registered: Result<UInt64, WatchError> = inner.withLock { inner in
            switch inner.state.events(after: revision, prefix: prefix) {
            case .failure(let error):
                return .failure(error)
            case .success(let past):
                let id = inner.nextWatcher
                inner.nextWatcher += 1
                inner.watchers[id] = Watcher(scope: PathPrefix(prefix), delivered: revision, continuation: continuation)
                for event in past where !Self.yield(event, to: id, in: &inner) {
                    inner.watchers[id] = nil
                    return .failure(.compacted(resumeFrom: event.revision))
                }
                inner.watchers[id]?.delivered = max(revision, inner.state.revision)
                return .success(id)
            }
        }
        switch registered {
        case .failure(let error):
            continuation.finish()
            throw error
        case .success(let id):
            if inner.withLock({ $0.watchesEnded }) { endWatches() }
            continuation.onTermination = { [weak self] _ in
                _ = self?.inner.withLock { $0.watchers.removeValue(forKey: id) }
            }
            return stream
        }
    }

    /// How many watches are open.
    public var watcherCount: Int { inner.withLock { $0.watchers.count } }

    /// Ends every watch, and every one opened from now on, as delivered so far: the node is stopping, and a watch,
    /// which never ends on its own, would hold up the API server's graceful stop. Each watcher goes on at another
    /// node from the revision after the last it got.
    public func endWatches() {
        let open = inner.withLock { inner in
            inner.watchesEnded = true
            defer { inner.watchers = [:] }
            return inner.watchers.values.map(\.continuation)
        }
        for continuation in open { continuation.finish() }
    }

    // MARK: - Delivery (under the lock)

    /// Gives `events` to every watcher whose prefix they fall under; returns the watchers that fell behind, removed,
    /// with the revision each must resume from (finish them outside the lock).
    private static func deliver(_ events: [WatchEvent], in inner: inout Inner) -> [(WatchStream.Continuation, Revision)] {
        var ended: [(WatchStream.Continuation, Revision)] = []
        var full: [UInt64] = []
        let newest = events.last!.revision
        // In place through the values (no lookup per watcher): this runs for every write the node applies. (A plain
        // index, not `indices`, which would hold the storage and make the first change copy it.)
        var i = inner.watchers.startIndex
        while i != inner.watchers.endIndex {
            defer { inner.watchers.formIndex(after: &i) }
            let watcher = inner.watchers.values[i]
            // A watch opened from a revision this replica had not reached yet (it was behind, or replaying its log
            // after a restart) gets nothing before that revision.
            for event in events where event.revision > watcher.delivered && watcher.scope.covers(event.path) {
                if !offer(event, to: watcher.continuation) {
                    full.append(inner.watchers.keys[i])
                    ended.append((watcher.continuation, event.revision))
                    break
                }
            }
            if watcher.delivered < newest { inner.watchers.values[i].delivered = newest }
        }
        for id in full { inner.watchers[id] = nil }
        return ended
    }

    /// False (and the watcher removed) if its buffer is full.
    private static func yield(_ event: WatchEvent, to id: UInt64, in inner: inout Inner) -> Bool {
        guard let watcher = inner.watchers[id] else { return false }
        if offer(event, to: watcher.continuation) { return true }
        inner.watchers[id] = nil
        return false
    }

    /// False if the stream's buffer is full or it ended.
    private static func offer(_ event: WatchEvent, to continuation: WatchStream.Continuation) -> Bool {
        switch continuation.yield(event) {
        case .enqueued: return true
        case .dropped, .terminated: return false
        @unknown default: return false
        }
    }
}
