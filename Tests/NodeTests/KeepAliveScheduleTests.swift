import Testing

@testable import CircuitNode

@Suite("When a host keeps its session alive")
struct KeepAliveScheduleTests {
    let t0 = ContinuousClock.now
    func at(_ millis: Int64) -> ContinuousClock.Instant { t0 + .milliseconds(millis) }

    @Test("one is due a third of the TTL after the last answered one was sent, and waits at most a fifth of the TTL (200 ms at least)")
    func dueAfterAThird() {
        var s = KeepAliveSchedule(ttlMillis: 6000, now: at(0))
        #expect(s.callTimeout == .milliseconds(1200))
        #expect(!s.isDue(now: at(1999)))
        #expect(s.isDue(now: at(2000)))
        // Sent at 2000, answered at 2100: the lease, and the next keep-alive, count from 2000.
        #expect(s.answered(sentAt: at(2000), at: at(2100)) == nil)
        #expect(!s.isDue(now: at(3999)) && s.isDue(now: at(4000)))
        #expect(KeepAliveSchedule(ttlMillis: 300, now: at(0)).callTimeout == .milliseconds(200))
    }

    @Test("one not answered is tried again a tenth of the TTL later, not a third: a stuck call leaves time for more before the lease ends")
    func retriesSoon() {
        var s = KeepAliveSchedule(ttlMillis: 6000, now: at(0))
        // Sent at 2000; no answer within its 1.2 s.
        #expect(s.failed(at: at(3200)) == nil)
        #expect(!s.isDue(now: at(3799)))
        #expect(s.isDue(now: at(3800)))
        // The second, sent at 3800, is answered: a third of the TTL from its sending.
        s.answered(sentAt: at(3800), at: at(3900))
        #expect(!s.isDue(now: at(5799)) && s.isDue(now: at(5800)))
    }

    @Test("past two thirds of the TTL without an answer the session is reported at risk, once until the next answer")
    func atRisk() {
        var s = KeepAliveSchedule(ttlMillis: 6000, now: at(0))
        #expect(s.failed(at: at(4000)) == nil)
        #expect(s.failed(at: at(4001)) == .milliseconds(4001))
        #expect(s.failed(at: at(5000)) == nil, "reported once")
        #expect(s.answered(sentAt: at(5500), at: at(5500)) == .milliseconds(5500), "answered late: reported")
        #expect(s.failed(at: at(9500)) == nil)
        #expect(s.failed(at: at(9501)) == .milliseconds(4001))
    }

    @Test("an answer's status is what the keep-alive came to; recording it warns as answered and failed do, and a session gone records nothing")
    func outcomes() {
        #expect(KeepAliveOutcome(status: 200) == .renewed && KeepAliveOutcome(status: 404) == .gone)
        #expect(KeepAliveOutcome(status: 503) == .unanswered && KeepAliveOutcome(status: nil) == .unanswered)
        var s = KeepAliveSchedule(ttlMillis: 6000, now: at(0))
        #expect(s.record(.unanswered, sentAt: at(3000), at: at(4001)) == .atRisk(.milliseconds(4001)))
        #expect(s.record(.gone, sentAt: at(4100), at: at(4200)) == nil)
        #expect(s.record(.renewed, sentAt: at(4300), at: at(4400)) == .answeredLate(.milliseconds(4400)))
        #expect(!s.isDue(now: at(6299)) && s.isDue(now: at(6300)), "the lease counts from 4300, when the renewal was sent")
    }
}
