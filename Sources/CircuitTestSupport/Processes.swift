import Foundation

/// When process `pid` started (field 22 of /proc/PID/stat, in clock ticks since boot); nil if there is no such
/// process. With the pid it names one process: a pid is used again once its process has ended and been reaped.
public func processStartTime(_ pid: pid_t) -> UInt64? {
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")")
    else { return nil }
    // After the command's closing parenthesis: state is field 3, so start time (22) is the 20th.
    let fields = stat[stat.index(after: close)...].split(separator: " ")
    return fields.count > 19 ? UInt64(fields[19]) : nil
}

/// Sends `signal` to `pid` only if it is still the process that started at `startedAt` (see `processStartTime`): a
/// test that cleans up a child it no longer owns must not hit whatever process was given the pid since, such as
/// another test's daemon.
public func killIfStill(_ pid: pid_t, startedAt: UInt64?, signal: Int32 = SIGKILL) {
    guard let startedAt, processStartTime(pid) == startedAt else { return }
    kill(pid, signal)
}
