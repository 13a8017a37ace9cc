import NIOCore
import Synchronization
import Testing

@testable import CircuitNode

@Suite("When a daemon keeps free memory for large messages")
struct FreeMemoryPolicyTests {
    @Test("it starts lean, keeps from the first large read, and gives back after a whole period without one")
    func keepsWhileLargeReadsFlow() {
        var p = FreeMemoryPolicy(managed: true)
        #expect(!p.keeping)
        #expect(p.periodEnded() == nil)
        #expect(p.largeRead() == .keep)
        #expect(p.keeping)
        // Later large reads change nothing; the period they came in does not give back.
        #expect(p.largeRead() == nil)
        #expect(p.periodEnded() == nil)
        #expect(p.keeping)
        // A read in the next period keeps it for one more.
        #expect(p.largeRead() == nil)
        #expect(p.periodEnded() == nil)
        // A period with none: lean again, once.
        #expect(p.periodEnded() == .giveBack)
        #expect(!p.keeping)
        #expect(p.periodEnded() == nil)
        // And the next large read keeps again.
        #expect(p.largeRead() == .keep)
    }

    @Test("settings the operator chose through glibc's environment are never changed")
    func operatorsChoiceWins() {
        var p = FreeMemoryPolicy(managed: false)
        #expect(p.largeRead() == nil)
        #expect(p.periodEnded() == nil)
        #expect(!p.keeping)
    }

    @Test("a read of a large message is noted, a small one is not, and the read sizes still adapt as NIO's do")
    func readsAreNoted() {
        let base = AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 2048, maximum: 1 << 20)
        let noted = Atomic(0)
        var noting = NotingLargeReads(base: base) { noted.add(1, ordering: .relaxed) }
        var plain = base
        for bytes in [2048, 4096, 8192, 1 << 20, 1 << 20, 100] {
            #expect(noting.record(actualReadBytes: bytes) == plain.record(actualReadBytes: bytes))
            #expect(noting.nextBufferSize() == plain.nextBufferSize())
        }
        #expect(noted.load(ordering: .relaxed) == 2)
    }
}
