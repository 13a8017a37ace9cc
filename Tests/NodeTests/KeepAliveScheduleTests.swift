import Testing

@testable import CircuitNode

@Suite("When a host keeps its session alive")
struct KeepAliveScheduleTests {
    let t0 = ContinuousClock.now
    func at(_ millis: Int64) -> ContinuousClock.Instant { t0 + .milliseconds(millis) }

    @Test("one is due a third of the TTL after the last answer, and waits at most a third of the TTL (200 ms at least)")
    func dueAfterAThird() {
        var s = KeepAliveSchedule(ttlMillis: 6000, now: at(0))
        #expect(s.callTimeout == .milliseconds(2000))
        #expect(!s.isDue(now: at(1999)))
        #expect(s.isDue(now: at(2000)))
        #expect(s.answered(at: at(2100)) == nil)
        #expect(!s.isDue(now: at(4099)) && s.isDue(now: at(4100)))
        #expect(KeepAliveSchedule(ttlMillis: 300, now: at(0)).callTimeout == .milliseconds(200))
    }

    @Test("one not answered is tried again a tenth of the TTL later, not a third: a stuck call leaves time for more before the lease ends")
    func retriesSoon() {
        var s = KeepAliveSchedule(ttlMillis: 6000, now: at(0))
        // Sent at 2000; no answer within its 2 s.
        #expect(s.failed(at: at(4000)) == nil)
        #expect(!s.isDue(now: at(4599)))
        #expect(s.isDue(now: at(4600)))
        // The second is answered: a third of the TTL from then.
        s.answered(at: at(4700))
        #expect(!s.isDue(now: at(6699)) && s.isDue(now: at(6700)))
    }

    @Test("past two thirds of the TTL without an answer the session is reported at risk, once until the next answer")
    func atRisk() {
        var s = KeepAliveSchedule(ttlMillis: 6000, now: at(0))
        #expect(s.failed(at: at(4000)) == nil)
        #expect(s.failed(at: at(4001)) == .milliseconds(4001))
        #expect(s.failed(at: at(5000)) == nil, "reported once")
        #expect(s.answered(at: at(5500)) == .milliseconds(5500), "answered late: reported")
        #expect(s.failed(at: at(9500)) == nil)
        #expect(s.failed(at: at(9501)) == .milliseconds(4001))
    }
}
