import CircuitStateMachine
import Logging
import ServiceLifecycle
import Synchronization

/// While this member leads: places jobs and places them again when their host is lost (see `JobKeeper`). It looks
/// whenever a job or a job's process changes (`NodeContext.jobsChanged`), and at least every 100 ms (a host's loss
/// shows as its session's expiry).
struct JobAgent: Service {
    let node: NodeContext

    func run() async throws {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                if node.service.driver.status.role == .leader { await keepJobs() }
                await node.jobsChanged.wait(timeout: .milliseconds(100))
            }
        }
    }

    /// The jobs not ended yet, with their paths.
    private static func openJobs(_ state: ControlState) -> [(path: String, state: JobState)] {
        state.descendants(of: Names.jobsRoot).compactMap { path in
            guard case .job(let j)? = state.anchors[path]?.element, !j.ended else { return nil }
            return (path, j)
        }
    }

    /// While leader: places jobs, and places them again when their host is lost (see `JobKeeper`).
    private func keepJobs() async {
        // Decided on the state as of a read barrier: a new leader may not have applied yet what the last one
        // committed (a placement among it), and would place a job placed already.
        guard !node.service.state.read({ Self.openJobs($0).isEmpty }) else { return }
        guard let (jobs, alive, processes) = try? await node.service.read(.linearizable, { state in
            let jobs = Self.openJobs(state)
            let alive = state.hostList.filter { $0.state == .alive }.map(\.id)
            var processes: [String: ProcState] = [:]
            for job in jobs {
                for host in alive {
                    let path = JobKeeper.processPath(job: job.path, host: host)
                    if case .proc(let p)? = state.anchors[path]?.element { processes[path] = p }
                }
            }
            return (jobs, alive, processes)
        }) else { return }
        guard !jobs.isEmpty else { return }
        let current = Dictionary(jobs.map { ($0.path, $0.state) }, uniquingKeysWith: { a, _ in a })
        for action in JobKeeper.decide(jobs: jobs, alive: alive, processes: processes) {
            do {
                switch action {
                case .place(let job, let host, let process, let attempt):
                    guard var state = current[job] else { continue }
                    if processes[process] != nil { _ = try await node.service.execute(.delete(path: process, version: nil)) }
                    let created = try await node.service.execute(
                        .create(path: process, element: .proc(ProcState(command: state.command, attempts: attempt - 1)), session: 0, sequential: false))
                    if case .failed(let e) = created { throw e }
                    state.phase = .placed
                    state.host = host
                    state.attempts = attempt
                    _ = try await node.service.execute(.updateJob(path: job, state: state))
                    node.logger.info("placed a job", metadata: ["job": "\(job)", "host": "\(host)", "attempt": "\(attempt)"])
                case .record(let job, let state):
                    _ = try await node.service.execute(.updateJob(path: job, state: state))
                    if state.phase == .failed || state.phase == .pending {
                        node.logger.warning("a job's host was lost", metadata: ["job": "\(job)", "phase": "\(state.phase)", "attempts": "\(state.attempts)"])
                    }
                }
            } catch {
                node.logger.info("could not carry out a job's placement yet", metadata: ["action": "\(action)", "error": "\(error)"])
                return
            }
        }
    }

}

/// A wake-up for one waiter: `ring` ends the current or the next `wait`.
final class Bell: Sendable {
    private struct State {
        var rung = false
        var waiter: CheckedContinuation<Void, Never>?
    }
    private let state = Mutex(State())

    func ring() {
        let waiter = state.withLock { s -> CheckedContinuation<Void, Never>? in
            guard let w = s.waiter else {
                s.rung = true
                return nil
            }
            s.waiter = nil
            return w
        }
        waiter?.resume()
    }

    /// Until rung (or rung since the last wait), or `timeout`.
    func wait(timeout: Duration) async {
        let timer = Task {
            try? await Task.sleep(for: timeout)
            if !Task.isCancelled { ring() }
        }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let ready = state.withLock { s -> Bool in
                if s.rung {
                    s.rung = false
                    return true
                }
                s.waiter = c
                return false
            }
            if ready { c.resume() }
        }
        timer.cancel()
    }
}
