import Foundation

/// What /proc says of a process: whether it is on its way out, and whether a pid still names the process that started
/// at a given time (a pid is used again once its process has ended and been reaped).
public enum ProcessIdentity {
    /// The fields of /proc/PID/stat after the command's closing parenthesis (a command may hold spaces and
    /// parentheses): the state (field 3) first, the start time (field 22) 20th. Nil if there is no such process.
    static func statFields(_ pid: pid_t) -> [Substring]? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")")
        else { return nil }
        return stat[stat.index(after: close)...].split(separator: " ")
    }

    /// Whether `pid` is the process a host started at `startedAt` (milliseconds since the epoch): it runs, it leads
    /// its own process group (as every child a host starts does), and it started then (from /proc: boot time plus its
    /// start in clock ticks; the boot time is known to the second, so within 2.5 s). Not whatever took its pid since.
    public static func isSame(_ pid: pid_t, startedAt: UInt64) -> Bool {
        guard getpgid(pid) == pid, let fields = statFields(pid),
            let boot = (try? String(contentsOfFile: "/proc/stat", encoding: .utf8))?.split(separator: "\n")
                .first(where: { $0.hasPrefix("btime ") }).flatMap({ UInt64($0.dropFirst(6)) })
        else { return false }
        guard fields.count > 19, fields[0] != "Z", let ticks = UInt64(fields[19]) else { return false }
        let started = boot * 1000 + ticks * 1000 / UInt64(sysconf(Int32(_SC_CLK_TCK)))
        let difference = started > startedAt ? started - startedAt : startedAt - started
        return difference < 2500
    }

    /// Whether process `pid` is gone or on its way out: its main thread a zombie (`Z`), other threads perhaps still
    /// leaving the kernel with the process's files, locks included, still open.
    public static func isExiting(_ pid: pid_t) -> Bool {
        guard let fields = statFields(pid) else { return true }
        return fields.first == "Z"
    }

    /// Whether process `pid` has ended altogether: gone, or a zombie with no thread left but its main one (the
    /// kernel has closed its files).
    public static func hasEnded(_ pid: pid_t) -> Bool {
        guard isExiting(pid) else { return false }
        let threads = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        return threads.count <= 1
    }
}
