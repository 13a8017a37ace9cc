import CircuitAPI
import CircuitClient
import CircuitNode
import CircuitTestSupport
import Foundation
import Testing

@Suite("Fault-tolerant jobs", .serialized, .timeLimit(.minutes(2)))
struct JobDaemonTests {
    @Test("a job is placed by the leader on a live host; kill -9 of that host's daemon places it again on another (attempt 2), and it ends there; the dead host's process is lost, and its daemon restarted stops it; the CLI runs and waits for one")
    func relaunchedAfterHostLoss() async throws {
        let (cluster, leader) = try await daemonsWithWorker(ttlMillis: 1500)
        defer { cluster.stopAll(signal: SIGKILL) }
        var client = cluster.client(leader)
        client.timeout = 30

        let first = try await startJobThatRunsOnce("/jobs/work", client)
        let firstHost = try #require(first.host)
        #expect(first.phase == "placed" && first.attempts == 1)
        let attempt = try await client.peek("/\(firstHost)/jobs/work")
        let orphan = try #require(attempt.pid), orphanStart = try #require(attempt.startedAt)
        // Only while the pid is still the first attempt: once it has ended, the pid may be another test's daemon.
        defer { if ProcessIdentity.isSame(pid_t(orphan), startedAt: orphanStart) { kill(pid_t(orphan), SIGKILL) } }

        // Its host's daemon dies; its session expires; the job goes to another host.
        let victim = try #require(cluster.members.firstIndex { $0.folder.hostID == firstHost })
        cluster.kill9(victim)
        var asker = cluster.client(victim == leader ? (leader + 1) % 3 : leader)
        asker.timeout = 30
        let ended = try await asker.wait("/jobs/work")
        #expect(ended.phase == "exited" && ended.exitCode == 0 && ended.attempts == 2, "\(ended)")
        #expect(ended.host != firstHost)
        // The dead host's process stays, lost, for whoever waits on it.
        #expect(try await asker.peek("/\(firstHost)/jobs/work").phase == "lost")
        #expect(try await asker.wait("/\(firstHost)/jobs/work").phase == "lost")
        // Its daemon, restarted, finds the first attempt's process still running (its group outlived the daemon),
        // declared lost meanwhile: it stops it, for the work has moved on.
        #expect(ProcessIdentity.isSame(pid_t(orphan), startedAt: orphanStart), "the first attempt outlived its daemon")
        try cluster.start(victim)
        try await eventually("the lost attempt stopped by its restarted host", timeout: .seconds(20)) {
            !ProcessIdentity.isSame(pid_t(orphan), startedAt: orphanStart)
        }

        // The CLI: run under /jobs, then wait (exit status 0 for exit 0).
        let api = cluster.members[victim == leader ? (leader + 1) % 3 : leader].api
        let ran = try await runCircuit(["run", "--node", api, "--attempts", "2", "/jobs/cli", "/bin/sh", "-c", "exit 0"])
        #expect(ran.0 == 0, "\(ran)")
        let waited = try await runCircuit(["wait", "--node", api, "/jobs/cli"])
        #expect(waited.0 == 0 && waited.1.contains("\"max_attempts\" : 2"), "\(waited)")
        // A job's name lives under /jobs only.
        let misplaced = try await runCircuit(["run", "--node", api, "/records/x", "/bin/true"])
        #expect(misplaced.0 == 1 && misplaced.2.contains("is a proc, not a record: only records live under /records"), "\(misplaced)")
    }

    @Test("a job whose host stops gracefully (SIGTERM) is placed again on another host, not ended as signaled by its host's stop")
    func relaunchedAfterGracefulStop() async throws {
        let (cluster, leader) = try await daemonsWithWorker(ttlMillis: 1500)
        defer { cluster.stopAll(signal: SIGKILL) }
        var client = cluster.client(leader)
        client.timeout = 30
        let firstHost = try #require(try await startJobThatRunsOnce("/jobs/stopped", client).host)

        // Its host's daemon stops as a rolling restart stops it: its children go with it.
        let victim = try #require(cluster.members.firstIndex { $0.folder.hostID == firstHost })
        let daemon = try #require(cluster.members[victim].process)
        kill(daemon.processIdentifier, SIGTERM)
        #expect(DaemonProcesses.waitForExit(daemon, timeout: .seconds(15)), "the daemon stopped")
        var asker = cluster.client(victim == leader ? (leader + 1) % 3 : leader)
        asker.timeout = 30
        let ended = try await asker.wait("/jobs/stopped")
        #expect(ended.phase == "exited" && ended.exitCode == 0 && ended.attempts == 2, "\(ended)")
        #expect(ended.host != firstHost)
    }
}

/// Runs a job (3 attempts) whose first attempt marks that it ran and then works for a minute, and whose later ones
/// find the mark and end (exit 0); answers the job's element once its first attempt runs.
private func startJobThatRunsOnce(_ job: String, _ client: CircuitClient) async throws -> ElementView {
    let mark = try temporaryFolder("job") + "/ran"
    let script = "if [ -e \(mark) ]; then exit 0; fi; touch \(mark); exec sleep 60"
    _ = try await client.run(job, ProcCommandView(path: "/bin/sh", args: ["-c", script]), maxAttempts: 3)
    try await eventually("the first attempt running", timeout: .seconds(20)) {
        guard let view = try? await client.peek(job), let host = view.host else { return false }
        return (try? await client.peek("/\(host)\(job)"))?.phase == "running"
    }
    return try await client.peek(job)
}
