import CircuitStateMachine

/// The leader's rules for fault-tolerant jobs (`/jobs/...`), as a pure function of what the control state holds:
/// the jobs, the live hosts, and the processes the jobs' attempts run as. The leader carries the actions out through
/// the log; a new leader reads the same state and goes on.
///
/// - A pending job is placed on the live host running the fewest placed jobs (ties by id), not the host of its last
///   attempt if another is live: a process element at `/X<host>/jobs/...` (the job's path under that host).
/// - A placed job whose process exited or was signaled has ended so.
/// - A placed job whose host is no longer alive (its subtree went with it), or whose process was reported lost or
///   removed, is placed again, until it has had `maxAttempts` placements; then it has failed.
/// - A process found for a job on a host other than the one recorded (a leader placed it and stopped before it
///   recorded the placement) is adopted, not placed twice; if it has ended already (and is a later attempt than any
///   recorded), the job has ended so.
///
/// At least once: an attempt's host may have run part or all of the work before it was lost.
struct JobKeeper {
    enum Action: Sendable, Hashable {
        /// Create the attempt's process at `process` (on `host`), then record the job as placed there.
        case place(job: String, host: String, process: String, attempt: UInt32)
        /// Record the job's new state.
        case record(job: String, JobState)
    }

    /// The process path of `job`'s attempt on `host`: `/X<host>/jobs/...`.
    static func processPath(job: String, host: String) -> String { "/" + host + job }

    /// What to do now. `processes`: the process elements at the jobs' process paths, by path.
    static func decide(
        jobs: [(path: String, state: JobState)], alive: [String], processes: [String: ProcState]
    ) -> [Action] {
        var load: [String: Int] = [:]
        for job in jobs where job.state.phase == .placed { load[job.state.host, default: 0] += 1 }
        let live = Set(alive)
        var actions: [Action] = []
        for (path, state) in jobs where !state.ended {
            var job = state
            if job.phase == .placed {
                if let p = processes[processPath(job: path, host: job.host)], live.contains(job.host) {
                    switch p.phase {
                    case .exited:
                        job.phase = .exited
                        job.exitCode = p.exitCode
                        actions.append(.record(job: path, job))
                        continue
                    case .signaled:
                        job.phase = .signaled
                        job.signal = p.signal
                        actions.append(.record(job: path, job))
                        continue
                    case .pending, .running:
                        continue
                    case .lost:
                        break  // placed again below
                    }
                }
            }
            // An attempt later than any recorded that already ended on another host (placed by a leader that stopped
            // before recording it, and over before the next leader looked): the job ended so.
            if let (host, p) = alive.lazy.compactMap({ host in processes[processPath(job: path, host: host)].map { (host, $0) } })
                .first(where: { host, p in host != job.host && (p.phase == .exited || p.phase == .signaled) && p.attempts > job.attempts })
            {
                job.phase = p.phase == .exited ? .exited : .signaled
                job.host = host
                job.attempts = p.attempts
                job.exitCode = p.exitCode
                job.signal = p.signal
                actions.append(.record(job: path, job))
                continue
            }
            // Not placed, or its attempt was lost: unless an attempt is already under way elsewhere.
            if let adopted = alive.first(where: { host in
                host != job.host
                    && (processes[processPath(job: path, host: host)].map { $0.phase == .pending || $0.phase == .running } ?? false)
            }) {
                job.phase = .placed
                job.host = adopted
                job.attempts = max(job.attempts + 1, processes[processPath(job: path, host: adopted)]!.attempts)
                actions.append(.record(job: path, job))
                continue
            }
            guard job.attempts < job.maxAttempts else {
                job.phase = .failed
                actions.append(.record(job: path, job))
                continue
            }
            let candidates = alive.count > 1 ? alive.filter { $0 != job.host } : alive
            guard let host = candidates.min(by: { (load[$0, default: 0], $0) < (load[$1, default: 0], $1) }) else {
                if job.phase != .pending {
                    job.phase = .pending
                    actions.append(.record(job: path, job))
                }
                continue
            }
            load[host, default: 0] += 1
            actions.append(.place(job: path, host: host, process: processPath(job: path, host: host), attempt: job.attempts + 1))
        }
        return actions
    }
}
