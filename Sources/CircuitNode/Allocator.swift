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
/// The client verbs (`tuneForLargeMessages`) keep that always (a long-lived `circuit mount` or `watch` too). A daemon
/// (`manageDaemonMemory`) keeps it only while large data flows: it starts lean (once free memory at a heap's top
/// reaches 1 MiB, glibc gives all but 128 KiB of it back), keeps free memory from the first large message into one of
/// its channels or read of 256 KiB or more on a client's connection (`noteLargeData`), and goes lean again after a
/// whole period (5 to 10 seconds) with neither. Lean matters because `malloc_trim` returns the free pages inside
/// every heap and the top of the main one, but not the free top of the other heaps (the arenas glibc gives threads),
/// which only a free in that heap gives back, and only past the threshold: under `bench compare`'s small writes, kept
/// at 32 MiB, a daemon held 4 to 10 MB there with almost nothing in use (`malloc_stats`), its RSS 66–71 MB against
/// 61–62 lean. What a heap kept while large data flowed stays until a later free in that heap reaches its top.
///
/// A process started with any of glibc's own settings (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`,
/// `MALLOC_TOP_PAD_`, or a `glibc.malloc.` tunable in `GLIBC_TUNABLES`) in its environment keeps them, and a daemon
/// then changes none of them (it still calls `malloc_trim` every period): the operator's choice wins.
public enum Allocator {
    static let mapThreshold: Int32 = 32 << 20
    static let keptTop: Int32 = 32 << 20
    static let leanTop: Int32 = 1 << 20
    /// A message of this many bytes or more, or a read of as many on a client's connection (a large message's
    /// pieces, a process's stdin streamed in, or many small messages at once), is large data.
    public static let largeData = 256 << 10

    /// Whether `environment` carries the operator's own settings for glibc's allocator.
    static func operatorChose(in environment: [String: String]) -> Bool {
        ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"].contains { environment[$0] != nil }
            || environment["GLIBC_TUNABLES"]?.contains("glibc.malloc.") == true
    }

    private static var operatorChose: Bool { operatorChose(in: ProcessInfo.processInfo.environment) }

    /// The trim threshold a change of the daemon's policy sets.
    static func trimThreshold(for change: FreeMemoryPolicy.Change) -> Int32 {
        switch change {
        case .keep: return keptTop
        case .giveBack: return leanTop
        }
    }

    /// For a client verb's whole life: blocks up to 32 MiB from the heaps, and up to 32 MiB free kept at a heap's top.
    public static func tuneForLargeMessages() {
        guard !operatorChose else { return }
        setMapThreshold(mapThreshold)
        setTrimThreshold(keptTop)
    }

    /// For a daemon: lean until large data (`noteLargeData`), kept while it continues, lean again after a `period`
    /// without any; and every `period`, the free pages inside all of glibc's heaps and the main heap's free top go
    /// back to the kernel (`malloc_trim`). glibc returns memory on its own only from the top of a heap, and a daemon
    /// that served many concurrent clients keeps what the burst used in its heaps' free lists: without this, its RSS
    /// stays near the peak long after the load. Under steady load the memory is taken again and faulted in at most
    /// once a period.
    public static func manageDaemonMemory(every period: Duration) -> Task<Void, Never> {
        if !operatorChose {
            policy.withLock { policy in
                policy = FreeMemoryPolicy(managed: true)
                setMapThreshold(mapThreshold)
                setTrimThreshold(trimThreshold(for: .giveBack))
            }
        }
        return Task.detached(priority: .background) {
            while !Task.isCancelled {
                try? await Task.sleep(for: period)
                policy.withLock { policy in
                    if let change = policy.periodEnded() { setTrimThreshold(trimThreshold(for: change)) }
                }
                #if canImport(Glibc)
                _ = circuit_malloc_trim()
                #endif
            }
        }
    }

    /// Large data is moving (`largeData` bytes or more at once): keep free memory for the next.
    public static func noteLargeData() {
        policy.withLock { policy in
            if let change = policy.largeData() { setTrimThreshold(trimThreshold(for: change)) }
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
        /// Once free memory at a heap's top reaches 1 MiB, give all but 128 KiB of it back.
        case giveBack
    }

    /// Whether the settings are the daemon's to change (not the operator's, through glibc's environment variables).
    let managed: Bool
    private(set) var keeping = false
    private var largeDataThisPeriod = 0

    init(managed: Bool) {
        self.managed = managed
    }

    /// Large data: keep free memory from now on.
    mutating func largeData() -> Change? {
        guard managed else { return nil }
        largeDataThisPeriod += 1
        if keeping { return nil }
        keeping = true
        return .keep
    }

    /// A period ended: if no large data came in it, give free memory back again.
    mutating func periodEnded() -> Change? {
        defer { largeDataThisPeriod = 0 }
        guard managed, keeping, largeDataThisPeriod == 0 else { return nil }
        keeping = false
        return .giveBack
    }
}
