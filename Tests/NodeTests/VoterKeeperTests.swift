import Testing

@testable import CircuitNode

@Suite("VoterKeeper: the leader keeps 3 or 5 voters when one is lost for long")
struct VoterKeeperTests {
    let voters: Set<String> = ["A", "B", "C"]

    @Test("nothing happens before the voter has been lost for the whole delay")
    func waitsForTheDelay() {
        var k = VoterKeeper(lostAfter: 1000)
        #expect(k.decide(now: 0, voters: voters, learners: ["L"], alive: ["A", "C", "L"]) == nil)
        #expect(k.decide(now: 999, voters: voters, learners: ["L"], alive: ["A", "C", "L"]) == nil)
        #expect(k.decide(now: 1000, voters: voters, learners: ["L"], alive: ["A", "C", "L"]) == .promote(candidates: ["L"], replacing: "B"))
    }

    @Test("a voter that comes back in time restarts its clock")
    func comebackResets() {
        var k = VoterKeeper(lostAfter: 1000)
        _ = k.decide(now: 0, voters: voters, learners: ["L"], alive: ["A", "C", "L"])
        _ = k.decide(now: 500, voters: voters, learners: ["L"], alive: ["A", "B", "C", "L"])
        #expect(k.decide(now: 1200, voters: voters, learners: ["L"], alive: ["A", "C", "L"]) == nil)
        #expect(k.decide(now: 2200, voters: voters, learners: ["L"], alive: ["A", "C", "L"]) == .promote(candidates: ["L"], replacing: "B"))
    }

    @Test(
        "odd voters promote a live learner first; even voters remove the lost one; no live learner, no change",
        arguments: [
            (["A", "B", "C"], ["L", "M"], ["A", "C", "M"], VoterKeeper.Action.promote(candidates: ["M"], replacing: "B")),
            (["A", "B", "C", "L"], [], ["A", "C", "L"], .remove("B")),
            (["A", "B", "C"], ["L"], ["A", "C"], nil),
            (["A", "B", "C"], [], ["A", "C"], nil),
            (["A", "B", "C", "D", "E"], ["L"], ["A", "C", "E", "L"], .promote(candidates: ["L"], replacing: "B")),
            (["A", "B", "C", "D", "E", "L"], [], ["A", "C", "E", "L"], .remove("B")),
        ] as [(Set<String>, Set<String>, Set<String>, VoterKeeper.Action?)])
    func rule(voters: Set<String>, learners: Set<String>, alive: Set<String>, expected: VoterKeeper.Action?) {
        var k = VoterKeeper(lostAfter: 10)
        _ = k.decide(now: 0, voters: voters, learners: learners, alive: alive)
        #expect(k.decide(now: 10, voters: voters, learners: learners, alive: alive) == expected)
    }

    @Test("turned off with a delay of 0")
    func off() {
        var k = VoterKeeper(lostAfter: 0)
        #expect(k.decide(now: 0, voters: voters, learners: ["L"], alive: ["A", "L"]) == nil)
        #expect(k.decide(now: 1_000_000, voters: voters, learners: ["L"], alive: ["A", "L"]) == nil)
    }
}
