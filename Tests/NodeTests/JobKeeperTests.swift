import CircuitStateMachine
import Testing

@testable import CircuitNode

@Suite("JobKeeper: the leader places jobs, and places them again when their host is lost")
struct JobKeeperTests {
    let command = ProcCommand(path: "/bin/true")
    func job(_ phase: JobPhase = .pending, host: String = "", attempts: UInt32 = 0, max: UInt32 = 3) -> JobState {
        JobState(command: command, maxAttempts: max, phase: phase, attempts: attempts, host: host)
    }
    func proc(_ phase: ProcPhase, code: Int32 = 0, attempts: UInt32 = 1) -> ProcState {
        ProcState(command: command, phase: phase, exitCode: code, attempts: attempts)
    }

    @Test("a pending job goes to the live host with the fewest placed jobs, ties by id")
    func placesOnLeastLoaded() {
        let actions = JobKeeper.decide(
            jobs: [("/jobs/a", job(.placed, host: "XA", attempts: 1)), ("/jobs/b", job())],
            alive: ["XA", "XB", "XC"], processes: ["/XA/jobs/a": proc(.running)])
        #expect(actions == [.place(job: "/jobs/b", host: "XB", process: "/XB/jobs/b", attempt: 1)])
    }

    @Test("a placed job ends as its process ended; a running one is left alone")
    func ends() {
        let exited = JobKeeper.decide(
            jobs: [("/jobs/a", job(.placed, host: "XA", attempts: 1))], alive: ["XA"], processes: ["/XA/jobs/a": proc(.exited, code: 4)])
        var done = job(.exited, host: "XA", attempts: 1)
        done.exitCode = 4
        #expect(exited == [.record(job: "/jobs/a", done)])
        let running = JobKeeper.decide(
            jobs: [("/jobs/a", job(.placed, host: "XA", attempts: 1))], alive: ["XA", "XB"], processes: ["/XA/jobs/a": proc(.running)])
        #expect(running.isEmpty)
    }

    @Test("a job whose host is lost, or whose process was lost or removed, is placed again elsewhere with the next attempt")
    func placesAgain() {
        let hostGone = JobKeeper.decide(jobs: [("/jobs/a", job(.placed, host: "XA", attempts: 1))], alive: ["XB", "XC"], processes: [:])
        #expect(hostGone == [.place(job: "/jobs/a", host: "XB", process: "/XB/jobs/a", attempt: 2)])
        let lost = JobKeeper.decide(
            jobs: [("/jobs/a", job(.placed, host: "XA", attempts: 1))], alive: ["XA", "XB"], processes: ["/XA/jobs/a": proc(.lost)])
        #expect(lost == [.place(job: "/jobs/a", host: "XB", process: "/XB/jobs/a", attempt: 2)], "not on the host that lost it")
        let removed = JobKeeper.decide(jobs: [("/jobs/a", job(.placed, host: "XA", attempts: 1))], alive: ["XA"], processes: [:])
        #expect(removed == [.place(job: "/jobs/a", host: "XA", process: "/XA/jobs/a", attempt: 2)], "the only live host")
    }

    @Test("after its last attempt's host is lost a job has failed; with no live host it waits, pending")
    func failsOrWaits() {
        var failed = job(.failed, host: "XA", attempts: 3)
        failed.maxAttempts = 3
        #expect(JobKeeper.decide(jobs: [("/jobs/a", job(.placed, host: "XA", attempts: 3))], alive: ["XB"], processes: [:])
            == [.record(job: "/jobs/a", failed)])
        #expect(JobKeeper.decide(jobs: [("/jobs/a", job(.placed, host: "XA", attempts: 1))], alive: [], processes: [:])
            == [.record(job: "/jobs/a", job(.pending, host: "XA", attempts: 1))])
        #expect(JobKeeper.decide(jobs: [("/jobs/a", job())], alive: [], processes: [:]).isEmpty)
    }

    @Test("an attempt already running on another host (placed by a leader that stopped before recording it) is adopted, not placed twice")
    func adopts() {
        let actions = JobKeeper.decide(
            jobs: [("/jobs/a", job(.placed, host: "XA", attempts: 1))], alive: ["XB", "XC"], processes: ["/XC/jobs/a": proc(.running, attempts: 2)])
        #expect(actions == [.record(job: "/jobs/a", job(.placed, host: "XC", attempts: 2))])
    }

    @Test("an attempt that already ended on another host (placed by a leader that stopped before recording it) ends the job so; an older attempt's end does not")
    func adoptsAnEndedAttempt() {
        let actions = JobKeeper.decide(
            jobs: [("/jobs/a", job(.placed, host: "XA", attempts: 1))], alive: ["XB", "XC"], processes: ["/XC/jobs/a": proc(.exited, code: 5, attempts: 2)])
        var ended = job(.exited, host: "XC", attempts: 2)
        ended.exitCode = 5
        #expect(actions == [.record(job: "/jobs/a", ended)], "not placed a third time")
        let older = JobKeeper.decide(
            jobs: [("/jobs/a", job(.placed, host: "XA", attempts: 2))], alive: ["XB", "XC"], processes: ["/XC/jobs/a": proc(.exited, attempts: 1)])
        #expect(older == [.place(job: "/jobs/a", host: "XB", process: "/XB/jobs/a", attempt: 3)])
    }

    @Test("ended jobs are left alone")
    func endedAlone() {
        #expect(JobKeeper.decide(jobs: [("/jobs/a", job(.exited, host: "XA", attempts: 1))], alive: ["XB"], processes: [:]).isEmpty)
    }
}
