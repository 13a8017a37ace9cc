import CircuitAPI
import CircuitClient
import CircuitNode
import CircuitTestSupport
import Foundation
import Testing

@Suite("Selects across hosts", .serialized, .timeLimit(.minutes(2)))
struct SelectDaemonTests {
    @Test("concurrent selects on one host over channels on two others: each fires exactly one clause, every message sent is received exactly once, refused offers lose nothing and leave their channels; default, send and wait clauses; the CLI")
    func selects() async throws {
        let cluster = try daemons(3)
        defer { cluster.stopAll(signal: SIGKILL) }
        let leader = try await cluster.leader()
        _ = try await cluster.allAlive()
        let hosts = (0..<3).map { cluster.members[$0].folder.hostID }
        let (a, b, c) = (hosts[leader], hosts[(leader + 1) % 3], hosts[(leader + 2) % 3])
        var asking = cluster.client(leader)
        asking.timeout = 60
        let client = asking
        let left = "/\(b)/left", right = "/\(c)/right"
        try await client.makeChannel(left, capacity: 0)
        try await client.makeChannel(right, capacity: 0)

        // 8 selects on host A, each waiting on both channels, while 8 distinct messages are sent, 4 to each channel,
        // all at once: both channels propose to the same selects concurrently, and some proposals are refused.
        // Each also waits on a process that runs on (it is never the one to fire).
        let count = 8
        _ = try await client.run("/\(b)/long", ProcCommandView(path: "/bin/sleep", args: ["60"]))
        for i in 0..<count {
            try await client.makeSelect(
                "/\(a)/sel\(i)",
                clauses: [
                    SelectClauseView(op: "recv", chan: left), SelectClauseView(op: "recv", chan: right),
                    SelectClauseView(op: "wait", proc: "/\(b)/long"),
                ])
        }
        let sent = (0..<count).map { "message-\($0)" }
        let outcomes = try await withThrowingTaskGroup(of: SelectOutcomeView?.self) { group in
            for i in 0..<count { group.addTask { try await client.select("/\(a)/sel\(i)") } }
            for (i, message) in sent.enumerated() {
                group.addTask {
                    let chan = try await client.channel(i % 2 == 0 ? left : right)
                    try await chan.send(Array(message.utf8))
                    return nil
                }
            }
            var out: [SelectOutcomeView] = []
            for try await o in group { if let o { out.append(o) } }
            return out
        }
        #expect(outcomes.count == count)
        #expect(outcomes.allSatisfy { $0.op == "recv" && $0.error == nil })
        #expect(outcomes.compactMap(\.message).sorted() == sent.sorted(), "every message received exactly once")
        for o in outcomes { #expect(o.chan == (o.message.map { Int($0.split(separator: "-")[1])! % 2 == 0 } == true ? left : right)) }
        // The losing offers left their channels: nothing waits there any more.
        for chan in [left, right] {
            try await eventually("no offer left in \(chan)") { (try? await client.channel(chan).stat())?.waitingReceivers == 0 }
        }

        _ = try await client.remove(element: "/\(b)/long")

        // default: fires when no other clause can.
        try await client.makeSelect("/\(a)/idle", clauses: [SelectClauseView(op: "recv", chan: left), SelectClauseView(op: "default")])
        let idle = try await client.select("/\(a)/idle")
        #expect(idle.clause == 1 && idle.op == "default")

        // A clause that can fire at once wins over default.
        let held = "/\(b)/held"
        try await client.makeChannel(held, capacity: 1)
        try await client.channel(held).send(Array("waiting".utf8))
        try await client.makeSelect("/\(a)/ready", clauses: [SelectClauseView(op: "recv", chan: held), SelectClauseView(op: "default")])
        let ready = try await client.select("/\(a)/ready")
        #expect(ready.clause == 0 && ready.message == "waiting", "\(ready)")

        // A clause may name the channel's create revision: a channel removed and made again at the path is not the
        // one meant, and the clause fires with that error; naming the new one's revision reaches it.
        let first = try await client.makeChannel("/\(b)/named", capacity: 1).revision
        _ = try await client.remove(element: "/\(b)/named")
        let second = try await client.makeChannel("/\(b)/named", capacity: 1).revision
        try await client.channel("/\(b)/named").send(Array("new".utf8))
        try await client.makeSelect("/\(a)/stale", clauses: [SelectClauseView(op: "recv", chan: "/\(b)/named", created: first)])
        let stale = try await client.select("/\(a)/stale")
        #expect(stale.clause == 0 && stale.message == nil && stale.error?.contains("was removed") == true, "\(stale)")
        let handle = try await client.channel("/\(b)/named")
        #expect(handle.createRevision == second)
        try await client.makeSelect("/\(a)/named", clauses: [.receive(from: handle)])
        let named = try await client.select("/\(a)/named")
        #expect(named.clause == 0 && named.message == "new" && named.error == nil, "\(named)")

        // send: its message goes to a plain receiver.
        try await client.makeSelect("/\(a)/give", clauses: [.send(Array("given".utf8), to: try await client.channel(right))])
        let receiver = Task { try await client.channel(right).receive() }
        let given = try await client.select("/\(a)/give")
        #expect(given.clause == 0 && given.op == "send" && given.error == nil)
        #expect(try await receiver.value == Array("given".utf8))

        // wait: a process's end.
        _ = try await client.run("/\(b)/short", ProcCommandView(path: "/bin/sh", args: ["-c", "exit 7"]))
        try await client.makeSelect("/\(a)/end", clauses: [SelectClauseView(op: "recv", chan: left), SelectClauseView(op: "wait", proc: "/\(b)/short")])
        let ended = try await client.select("/\(a)/end")
        #expect(ended.clause == 1 && ended.proc?.exitCode == 7)

        // Bad clauses are refused at creation, naming what is wrong.
        var refusal: String?
        do {
            try await client.makeSelect("/\(a)/bad", clauses: [SelectClauseView(op: "send", chan: left)])
        } catch {
            if case .api(let e) = error { refusal = e.message }
        }
        #expect(refusal?.contains("clause 0 (send) needs \"message\"") == true, "\(refusal ?? "")")

        // The CLI: mksel, then select prints the outcome.
        let api = cluster.members[leader].api
        let made = try await runCircuit(["mksel", "--node", api, "/\(a)/cli", #"[{"op": "recv", "chan": "\#(left)"}, {"op": "default"}]"#])
        #expect(made.0 == 0, "\(made)")
        let fired = try await runCircuit(["select", "--node", api, "/\(a)/cli"])
        #expect(fired.0 == 0 && fired.1.contains("\"op\" : \"default\""), "\(fired)")
    }
}
