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
}
