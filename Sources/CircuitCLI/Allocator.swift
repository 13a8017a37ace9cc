#if canImport(Glibc)
import CMalloc
#endif
import Foundation

/// glibc's allocator, set for every verb of `circuit` (the daemon, and the client verbs that move a channel's
/// messages or a process's output) for large messages. By default glibc maps each allocation of 128 KiB or
/// more on its own (raising that bound as large blocks are freed) and gives free memory at the top of each heap back
/// to the kernel once it passes twice that. A channel's 1 MiB messages, and the read buffers they arrive in, are then
/// often given back and faulted in again (zeroed by the kernel) for the next message. Here blocks up to 32 MiB come
/// from the heaps, and up to 32 MiB free at a heap's top is kept for the next message. (`bench elements`: a channel's
/// 1 MiB messages about 1.6 times as fast. Keeping 64 MiB gained nothing more and left a daemon 40 MB larger after
/// `bench api`.)
///
/// A process started with any of glibc's own settings (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`,
/// `MALLOC_TOP_PAD_`) in its environment keeps them: the operator's choice wins.
enum Allocator {
    static let mapThreshold: Int32 = 32 << 20
    static let trimThreshold: Int32 = 32 << 20

    static func tuneForLargeMessages() {
        #if canImport(Glibc)
        let environment = ProcessInfo.processInfo.environment
        guard !["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"].contains(where: { environment[$0] != nil })
        else { return }
        _ = circuit_malloc_set_mmap_threshold(mapThreshold)
        _ = circuit_malloc_set_trim_threshold(trimThreshold)
        #endif
    }

    /// Every `period`, free memory in all of glibc's arenas goes back to the kernel (`malloc_trim`). glibc returns
    /// memory only from the top of a heap, and a daemon that served many concurrent clients keeps what the burst used
    /// in its arenas' free lists: without this, its RSS stays near the peak long after the load. Under steady load
    /// the memory is taken again and faulted in at most once a period.
    static func returnFreeMemory(every period: Duration) -> Task<Void, Never> {
        Task.detached(priority: .background) {
            while !Task.isCancelled {
                try? await Task.sleep(for: period)
                #if canImport(Glibc)
                _ = circuit_malloc_trim()
                #endif
            }
        }
    }
}
