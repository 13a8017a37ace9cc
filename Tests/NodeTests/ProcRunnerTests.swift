import CircuitAPI
import CircuitTestSupport
import Foundation
import Logging
import Testing
@testable import CircuitNode

/// The process runner alone, with real children and no cluster: its reports queue unread.
@Suite("ProcRunner: a path's processes, one element after another")
struct ProcRunnerTests {
    /// A process that writes its pid to `pidFile`, then sleeps.
    static func pending(_ created: UInt64, pidFile: String) -> ElementView {
        var view = ElementView(kind: "proc")
        view.phase = "pending"
        view.createRevision = created
        view.command = ProcCommandView(path: "/bin/sh", args: ["-c", "echo $$ > \(pidFile); exec sleep 30"])
        return view
    }

    static func pid(_ file: String) async throws -> pid_t {
        try await eventually("\(file) written") { (try? String(contentsOfFile: file, encoding: .utf8))?.hasSuffix("\n") == true }
        return try #require(pid_t(try String(contentsOfFile: file, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)))
    }

    @Test("a removal told late (a lagging watch) stops only the child of an element created before it; the path's next child runs on until its own removal")
    func lateRemoval() async throws {
        let runner = ProcRunner(hostID: "X0000000000000001", api: "127.0.0.1:1", scrubGrace: .milliseconds(100), logger: Logger(label: "proc-runner-test"))
        let dir = try temporaryFolder("proc-runner")
        let path = "/X0000000000000001/p"
        runner.consider(path, Self.pending(5, pidFile: dir + "/5"))
        let first = try await Self.pid(dir + "/5")
        #expect(runner.signal(path, 0, createRevision: 5), "the first element's child runs")
        // The watch is behind: the element created at 9 is seen (as the state is now) before the removal of 5's.
        runner.consider(path, Self.pending(9, pidFile: dir + "/9"))
        let second = try await Self.pid(dir + "/9")
        #expect(runner.signal(path, 0, createRevision: 9), "the second element's child runs")
        try await eventually("the first element's child stopped to make way (and reaped)", timeout: .seconds(10)) { kill(first, 0) != 0 }
        runner.scrubbed(path, deletedAt: 8)
        #expect(await runner.io(path, createRevision: 9, timeout: .zero) != nil, "the first element's removal, told late, leaves the second's streams")
        #expect(kill(second, 0) == 0 && runner.signal(path, 0, createRevision: 9), "and its child")
        runner.scrubbed(path, deletedAt: 12)
        #expect(await runner.io(path, createRevision: 9, timeout: .zero) == nil, "its own removal takes its streams")
        try await eventually("the second element's child stopped by its own removal (and reaped)", timeout: .seconds(10)) {
            kill(second, 0) != 0 && !runner.signal(path, 0, createRevision: 9)
        }
    }

    @Test("a scrub's SIGKILL after the grace reaches the whole group: a child that ignores SIGTERM, and one left behind by a leader that ended")
    func scrubKillsTheGroup() async throws {
        let runner = ProcRunner(hostID: "X0000000000000001", api: "127.0.0.1:1", scrubGrace: .milliseconds(200), logger: Logger(label: "proc-runner-test"))
        let dir = try temporaryFolder("proc-runner")
        // The leader and its child both ignore SIGTERM: only the SIGKILL after the grace ends them.
        let stubborn = "/X0000000000000001/stubborn"
        var view = Self.pending(3, pidFile: dir + "/leader")
        view.command = ProcCommandView(path: "/bin/sh", args: ["-c", "trap '' TERM; sleep 300 & echo $! > \(dir)/child; echo $$ > \(dir)/leader; wait"])
        runner.consider(stubborn, view)
        let leader = try await Self.pid(dir + "/leader"), child = try await Self.pid(dir + "/child")
        runner.scrubbed(stubborn)
        // Gone, or a zombie: a child whose parent died is reaped by whoever adopts it, perhaps never here.
        func gone(_ pid: pid_t) -> Bool { kill(pid, 0) != 0 || ProcessIdentity.isExiting(pid) }
        try await eventually("the leader and its child killed after the grace", timeout: .seconds(30)) { gone(leader) && gone(child) }
        // The leader ends at SIGTERM; its child, which ignores it, is left in the group: the SIGKILL, sent once the
        // leader has been reaped, still reaches it (what is left of the group holds its id).
        let orphaned = "/X0000000000000001/orphaned"
        view = Self.pending(4, pidFile: dir + "/leader2")
        view.command = ProcCommandView(path: "/bin/sh", args: ["-c", "(trap '' TERM; exec sleep 300) & echo $! > \(dir)/child2; echo $$ > \(dir)/leader2; exec sleep 300"])
        runner.consider(orphaned, view)
        let leader2 = try await Self.pid(dir + "/leader2"), child2 = try await Self.pid(dir + "/child2")
        runner.scrubbed(orphaned)
        try await eventually("the leader ended by SIGTERM", timeout: .seconds(10)) { gone(leader2) }
        try await eventually("the left-behind child killed after the grace", timeout: .seconds(30)) { gone(child2) }
    }
}
