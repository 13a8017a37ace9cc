import CircuitAPI
import Testing

@testable import CircuitNode

/// The coordinator's decision for one wait of a select, as a pure value (docs/selects.md).
@Suite("SelectRun: one clause fires, once")
struct SelectRunTests {
    static func fired(_ clause: Int, error: String? = nil) -> SelectOutcomeView {
        var outcome = SelectOutcomeView(clause: clause, op: "recv")
        outcome.error = error
        return outcome
    }

    /// What each proposal, in order, is answered.
    static func answers(_ run: inout SelectRun, _ proposals: [SelectOutcomeView]) -> [Bool] {
        proposals.map { run.propose($0) }
    }

    @Test("the first clause proposed fires; others are refused; the same clause asked again (its answer lost) is accepted again")
    func firstWins() {
        var run = SelectRun()
        let answers = Self.answers(&run, [Self.fired(1), Self.fired(0), Self.fired(2), Self.fired(1)])
        #expect(answers == [true, false, false, true])
        #expect(run.decided == 1 && run.outcome?.error == nil)
    }

    @Test("a clause decided as failed (its offer's answer never came) never fires later, when its offer meets a message after all")
    func failedClauseNeverFires() {
        var run = SelectRun()
        let answers = Self.answers(&run, [Self.fired(0, error: "cannot reach X2 at 10.0.0.2:80: timed out"), Self.fired(0), Self.fired(1)])
        #expect(answers == [true, false, false], "the offer that reached its channel after all is refused, so its message stays there")
        #expect(run.outcome?.error != nil, "the client is told the clause failed")
    }

    @Test("a wait whose client went away refuses every clause")
    func abandoned() {
        var run = SelectRun()
        run.abandon()
        #expect(Self.answers(&run, [Self.fired(0)]) == [false])
        #expect(run.decided == nil)
    }
}
