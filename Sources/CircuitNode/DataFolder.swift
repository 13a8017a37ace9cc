import CircuitRaft
import Foundation

/// Why a daemon could not take its data folder.
public enum DataFolderError: Error, Sendable, CustomStringConvertible {
    case locked(path: String, holder: String)
    case unreadable(path: String, why: String)
    case noCluster(path: String)

    public var description: String {
        switch self {
        case .locked(let path, let holder):
            return "the data folder is in use by another circuit daemon (\(holder)); lock file \(path)"
        case .unreadable(let path, let why): return "cannot read \(path): \(why)"
        case .noCluster(let path):
            return "\(path) belongs to no cluster yet: start with --bootstrap to form one, or --join to join one"
        }
    }
}

/// A daemon's data folder: its identity, the cluster it belongs to, its Raft log and snapshots, and a lock that keeps
/// a second daemon out.
///
/// The host id (`X` + 16 hex digits) is chosen at random the first time and kept in `host-id`, so a host keeps its
/// name across restarts; the cluster id is written once the host belongs to a cluster.
public struct DataFolder: Sendable {
    public let path: String
    public let hostID: String

    /// Opens (creating if needed) the folder and its host id.
    public init(path: String) throws {
        self.path = path
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        let file = "\(path)/host-id"
        if let text = try? String(contentsOfFile: file, encoding: .utf8) {
            let id = text.trimmingCharacters(in: .whitespacesAndNewlines)
            guard HostID.isValid(id) else { throw DataFolderError.unreadable(path: file, why: "\(id.debugDescription) is no host id") }
            hostID = id
        } else {
            hostID = HostID.random()
            try Self.writeDurably(hostID + "\n", to: file)
        }
    }

    public var nodeID: NodeID { HostID.nodeID(hostID) }
    public var logPath: String { "\(path)/raft.sqlite" }
    public var snapshotPath: String { "\(path)/snapshots" }

    /// The cluster this host belongs to, if any.
    public func clusterID() throws -> UInt64? {
        let file = "\(path)/cluster-id"
        guard let text = try? String(contentsOfFile: file, encoding: .utf8) else { return nil }
        guard let id = UInt64(text.trimmingCharacters(in: .whitespacesAndNewlines), radix: 16) else {
            throw DataFolderError.unreadable(path: file, why: "not a cluster id")
        }
        return id
    }

    public func setClusterID(_ id: UInt64) throws {
        try Self.writeDurably(HostID.hex(id) + "\n", to: "\(path)/cluster-id")
    }

    /// Whether this host joined as a worker (in the membership, not in Raft): kept in `role` so a restart resumes
    /// it as one.
    public func isWorker() -> Bool {
        (try? String(contentsOfFile: "\(path)/role", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) == "worker"
    }

    public func setWorker() throws { try Self.writeDurably("worker\n", to: "\(path)/role") }

    /// Takes the folder's lock for the life of the process (an advisory `flock` on `lock`, released by the kernel
    /// when the process dies, even by kill -9). Throws if another daemon holds it. A holder that is dying (killed, its
    /// threads still leaving the kernel, as one in an fsync does) is waited for, up to `dyingHolder`: a supervisor
    /// that restarts a killed daemon at once would otherwise find the folder still taken.
    public func lock(dyingHolder: Duration = .seconds(10)) throws -> FolderLock {
        let file = "\(path)/lock"
        let fd = open(file, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw DataFolderError.unreadable(path: file, why: String(cString: strerror(errno))) }
        let deadline = ContinuousClock.now + dyingHolder
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let holder = (try? String(contentsOfFile: file, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
            if let pid = holder.flatMap({ pid_t($0) }), ProcessIdentity.isExiting(pid), ContinuousClock.now < deadline {
                usleep(10_000)
                continue
            }
            close(fd)
            throw DataFolderError.locked(path: file, holder: holder.map { "pid \($0)" } ?? "unknown")
        }
        let pid = "\(getpid())\n"
        _ = ftruncate(fd, 0)
        _ = pid.withCString { pwrite(fd, $0, strlen($0), 0) }
        return FolderLock(fd: fd)
    }

    static func writeDurably(_ text: String, to file: String) throws {
        let temp = file + ".tmp"
        try text.write(toFile: temp, atomically: false, encoding: .utf8)
        let fd = open(temp, O_RDONLY)
        if fd >= 0 {
            fsync(fd)
            close(fd)
        }
        guard rename(temp, file) == 0 else {
            throw DataFolderError.unreadable(path: file, why: String(cString: strerror(errno)))
        }
        let dir = open((file as NSString).deletingLastPathComponent, O_RDONLY)
        if dir >= 0 {
            fsync(dir)
            close(dir)
        }
    }
}

/// Held while the daemon runs.
public final class FolderLock: Sendable {
    private let fd: Int32
    init(fd: Int32) { self.fd = fd }
    deinit { close(fd) }
}

/// Host ids: `X` and 16 lowercase hex digits, the Raft node id in hex.
public enum HostID {
    public static func isValid(_ s: String) -> Bool {
        s.utf8.count == 17 && s.first == "X" && UInt64(s.dropFirst(), radix: 16) != nil
            && s.dropFirst().allSatisfy { $0.isHexDigit && !$0.isUppercase } && nodeID(s) != .none
    }

    public static func nodeID(_ s: String) -> NodeID { UInt64(s.dropFirst(), radix: 16) ?? .none }

    public static func string(_ id: NodeID) -> String { "X" + hex(id) }

    public static func hex(_ v: UInt64) -> String {
        let digits = String(v, radix: 16)
        return String(repeating: "0", count: 16 - digits.count) + digits
    }

    public static func random() -> String {
        var v: UInt64 = 0
        while v == .none { v = UInt64.random(in: 1...UInt64.max) }
        return string(v)
    }
}
