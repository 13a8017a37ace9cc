#if canImport(Glibc)
import CMalloc
#endif
import Foundation
import Synchronization

/// glibc's allocator, set for large messages.
///
/// By default glibc maps each allocation of 128 KiB or more on its own (raising that bound as large blocks are freed)
/// and gives free memory at the top of each heap back to the kernel once it passes twice that. A channel's 1 MiB
/// messages, and the read buffers they arrive in, are then often given back and faulted in again (zeroed by the
/// kernel) for the next message. So blocks up to 32 MiB come from the heaps, and, while large messages flow, up to
/// 32 MiB free at a heap's top is kept for the next message (`bench elements`: a channel's 1 MiB messages about 1.6
/// times as fast; keeping 64 MiB gained nothing more and left a daemon 40 MB larger after `bench api`).
///
/// The client verbs (`tuneForLargeMessages`) keep that for their short lives. A daemon (`manageDaemonMemory`) keeps it
/// only while large messages flow: it starts lean (free memory past 1 MiB at a heap's top goes back), keeps free
/// memory from its first read of 256 KiB or more on a client's connection, and goes lean again after a period with no
/// such read. The lean setting matters because `malloc_trim` returns the top of the main heap and the free pages
/// inside every heap, but not the free top of the other heaps (the arenas glibc gives threads), which only a free in
/// that heap gives back, and only past the threshold: under `bench compare`'s small writes, kept at 32 MiB, a daemon
/// held 4 to 10 MB there with almost nothing in use (`malloc_stats`), its RSS 66–71 MB against 61–62 lean.
///
/// A process started with any of glibc's own settings (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`,
/// `MALLOC_TOP_PAD_`) in its environment keeps them: the operator's choice wins.
public enum Allocator {
    static let mapThreshold: Int32 = 32 << 20
    static let keptTop: Int32 = 32 << 20
    static let leanTop: Int32 = 1 << 20
    /// A read of this many bytes or more on a client's connection is a large message's.
    public static let largeRead = 256 << 10

    private static var operatorChose: Bool {
        let environment = ProcessInfo.processInfo.environment
        return ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"].contains { environment[$0] != nil }
    }

    /// For a client verb's whole life: blocks up to 32 MiB from the heaps, and up to 32 MiB free kept at a heap's top.
    public static func tuneForLargeMessages() {
        guard !operatorChose else { return }
        setMapThreshold(mapThreshold)
        setTrimThreshold(keptTop)
    }

    /// For a daemon: lean until a large read (`noteLargeRead`), kept while they continue, lean again after a `period`
    /// without one; and every `period`, free memory in all of glibc's heaps goes back to the kernel (`malloc_trim`).
    /// glibc returns memory on its own only from the top of a heap, and a daemon that served many concurrent clients
    /// keeps what the burst used in its heaps' free lists: without this, its RSS stays near the peak long after the
    /// load. Under steady load the memory is taken again and faulted in at most once a period.
    public static func manageDaemonMemory(every period: Duration) -> Task<Void, Never> {
        let managed = !operatorChose
        if managed {
            setMapThreshold(mapThreshold)
            setTrimThreshold(leanTop)
            policy.withLock { $0 = FreeMemoryPolicy(managed: true) }
        }
        return Task.detached(priority: .background) {
            while !Task.isCancelled {
                try? await Task.sleep(for: period)
                policy.withLock { policy in
                    if policy.periodEnded() == .giveBack { setTrimThreshold(leanTop) }
                }
                #if canImport(Glibc)
                _ = circuit_malloc_trim()
                #endif
            }
        }
    }

    /// A read of `largeRead` bytes or more: a large message is moving, keep free memory for the next one.
    public static func noteLargeRead() {
        policy.withLock { policy in
            if policy.largeRead() == .keep { setTrimThreshold(keptTop) }
        }
    }

    private static let policy = Mutex(FreeMemoryPolicy(managed: false))

    private static func setMapThreshold(_ bytes: Int32) {
        #if canImport(Glibc)
        _ = circuit_malloc_set_mmap_threshold(bytes)
        #endif
    }

    private static func setTrimThreshold(_ bytes: Int32) {
        #if canImport(Glibc)
        _ = circuit_malloc_set_trim_threshold(bytes)
        #endif
    }
}

/// When a daemon keeps free memory at its heaps' tops for the next large message, and when it gives it back: the
/// decision alone, events in and the change of setting out (`Allocator` carries it out).
struct FreeMemoryPolicy: Sendable, Equatable {
    enum Change: Sendable, Equatable {
        /// Keep up to 32 MiB free at a heap's top.
        case keep
        /// Give free memory past 1 MiB at a heap's top back.
        case giveBack
    }

    /// Whether the settings are the daemon's to change (not the operator's, through glibc's environment variables).
    let managed: Bool
    private(set) var keeping = false
    private var largeReadsThisPeriod = 0

    init(managed: Bool) {
        self.managed = managed
    }

    /// A large read: keep free memory from now on.
    mutating func largeRead() -> Change? {
        guard managed else { return nil }
        largeReadsThisPeriod += 1
        if keeping { return nil }
        keeping = true
        return .keep
    }

    /// A period ended: if no large read came in it, give free memory back again.
    mutating func periodEnded() -> Change? {
        defer { largeReadsThisPeriod = 0 }
        guard managed, keeping, largeReadsThisPeriod == 0 else { return nil }
        keeping = false
        return .giveBack
    }
}
