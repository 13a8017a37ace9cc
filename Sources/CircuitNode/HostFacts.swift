import CircuitAPI
import Foundation

/// What `GET /v1/sys` tells of this host: its CPUs, memory and load from /proc, and the daemon's role.
enum HostFacts {
    private static let started = ContinuousClock.now

    static func view(of status: StatusView) -> SysView {
        let meminfo = (try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8)) ?? ""
        func kilobytes(_ key: String) -> UInt64 {
            guard let line = meminfo.split(separator: "\n").first(where: { $0.hasPrefix(key + ":") }) else { return 0 }
            return (UInt64(line.split(separator: " ").dropFirst().first ?? "") ?? 0) * 1024
        }
        let loadText = (try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8)) ?? ""
        let load = loadText.split(separator: " ").prefix(3).compactMap { Double($0) }
        let elapsed = ContinuousClock.now - started
        return SysView(
            host: status.host, role: status.role, term: status.term, leader: status.leader,
            cpus: ProcessInfo.processInfo.activeProcessorCount, memoryBytes: kilobytes("MemTotal"),
            memoryAvailableBytes: kilobytes("MemAvailable"), load: load, pid: getpid(),
            uptimeSeconds: elapsed / .seconds(1))
    }
}
