import NIOCore
import Synchronization
import Testing

@testable import CircuitNode

@Suite("When a daemon keeps free memory for large messages")
struct FreeMemoryPolicyTests {
    @Test("it starts lean, keeps from the first large data, and gives back after a whole period without any")
    func keepsWhileLargeDataFlows() {
        var p = FreeMemoryPolicy(managed: true)
        #expect(!p.keeping)
        #expect(p.periodEnded() == nil)
        #expect(p.largeData() == .keep)
        #expect(p.keeping)
        // More large data changes nothing; the period it came in does not give back.
        #expect(p.largeData() == nil)
        #expect(p.periodEnded() == nil)
        #expect(p.keeping)
        // Large data in the next period keeps it for one more.
        #expect(p.largeData() == nil)
        #expect(p.periodEnded() == nil)
        // A period with none: lean again, once.
        #expect(p.periodEnded() == .giveBack)
        #expect(!p.keeping)
        #expect(p.periodEnded() == nil)
        // And the next large data keeps again.
        #expect(p.largeData() == .keep)
    }

    @Test("keeping sets the large trim threshold, giving back the small one")
    func thresholds() {
        #expect(Allocator.trimThreshold(for: .keep) == 32 << 20)
        #expect(Allocator.trimThreshold(for: .giveBack) == 1 << 20)
    }

    @Test("settings the operator chose through glibc's environment are never changed")
    func operatorsChoiceWins() {
        var p = FreeMemoryPolicy(managed: false)
        #expect(p.largeData() == nil)
        #expect(p.periodEnded() == nil)
        #expect(!p.keeping)
        #expect(!Allocator.operatorChose(in: ["PATH": "/bin", "GLIBC_TUNABLES": "glibc.pthread.rseq=0"]))
        for chosen in [
            ["MALLOC_MMAP_THRESHOLD_": "131072"], ["MALLOC_TRIM_THRESHOLD_": "0"], ["MALLOC_TOP_PAD_": "0"],
            ["GLIBC_TUNABLES": "glibc.pthread.rseq=0:glibc.malloc.trim_threshold=0"],
        ] {
            #expect(Allocator.operatorChose(in: chosen), "\(chosen)")
        }
    }

    @Test("a read of 256 KiB or more is noted, a smaller one is not, and the read sizes still adapt as NIO's do")
    func readsAreNoted() {
        let base = AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 2048, maximum: 1 << 20)
        let noted = Atomic(0)
        var noting = NotingLargeReads(base: base) { noted.add(1, ordering: .relaxed) }
        var plain = base
        for bytes in [2048, 4096, 8192, (256 << 10) - 1, 256 << 10, 1 << 20, 100] {
            #expect(noting.record(actualReadBytes: bytes) == plain.record(actualReadBytes: bytes))
            #expect(noting.nextBufferSize() == plain.nextBufferSize())
        }
        #expect(noted.load(ordering: .relaxed) == 2)
    }
}
