import CircuitAPI
import CircuitClient
import CircuitStateMachine
import Foundation
import Logging
import Synchronization

/// The mount's behaviour, with no FUSE types: every operation the kernel asks for, answered through the cluster's API
/// (a `CircuitClient` of one node, usually the local daemon). The FUSE shell (`FuseMount`) calls these from its
/// worker threads through tasks and replies when they return, so a blocking read holds no thread and no other file
/// operation waits for it.
public final class CircuitFileSystem: Sendable {
    /// For quick calls (names, stat, records).
    let client: CircuitClient
    /// For calls that wait as long as they must (waitexit, recv, send, wait).
    let waiting: CircuitClient
    let logger: Logger

    struct State {
        var inodes = InodeTable()
        var handles: [UInt64: OpenFile] = [:]
        var nextHandle: UInt64 = 1
        /// Directories made with mkdir under records/ that hold no record yet (this mount's only), by path.
        var recordDirs: Set<String> = []
        /// The last failure under each element, by element path.
        var errors: [String: String] = [:]
        /// The live hosts as last read, and when (read again after `hostsMaxAge`).
        var hosts: (views: [HostView], at: ContinuousClock.Instant)?
        /// The last outcome of each select this mount waited for, by path.
        var outcomes: [String: SelectOutcomeView] = [:]
    }
    private let state = Mutex(State())

    public init(client: CircuitClient, logger: Logger) {
        self.client = client
        var waiting = client
        waiting.timeout = 7 * 24 * 3600
        self.waiting = waiting
        self.logger = logger
    }

    // MARK: - Inodes

    public func node(_ inode: UInt64) -> FSNode? { state.withLock { $0.inodes.node(inode) } }

    /// The inode for `node`, counting a lookup the kernel now holds.
    public func lookUp(_ node: FSNode) -> UInt64 { state.withLock { $0.inodes.lookUp(node) } }

    public func forget(_ inode: UInt64, count: UInt64) { state.withLock { $0.inodes.forget(inode, count: count) } }

    /// An inode number for a directory entry (the kernel takes no reference from a listing).
    public func entryInode(_ node: FSNode) -> UInt64 { state.withLock { $0.inodes.existing(node) } ?? 0xFFFF_FFFF }

    // MARK: - Names

    /// The child `name` of the directory `parent`.
    public func lookup(_ parent: FSNode, _ name: String) async throws(FSError) -> FSNode {
        if let fixed = parent.fixedChild(name) { return fixed }
        switch parent {
        case .root:
            if name == "records" { return .recordDir(FSNode.recordsRoot) }
            guard FSNode.isHostName(name), try await liveHosts().contains(where: { $0.id == name }) else {
                throw FSError(ENOENT, "no live host \(name)")
            }
            return .host(name)
        case .kindDir(let host, let kind):
            let path = "/\(host)/\(name)"
            guard try await peek(path).isElement(kind) else { throw FSError(ENOENT, "no \(kind.rawValue) \(path)") }
            return .element(host, kind, name)
        case .recordDir(let dir):
            let path = dir + "/" + name
            if state.withLock({ $0.recordDirs.contains(path) }) { return .recordDir(path) }
            switch try await peek(path) {
            case .record: return .record(path)
            case .directory: return .recordDir(path)
            default: throw FSError(ENOENT, "no record \(path)")
            }
        default:
            throw FSError(ENOENT, "no \(name) here")
        }
    }

    /// The entries of the directory `dir` (without `.` and `..`).
    public func list(_ dir: FSNode) async throws(FSError) -> [(String, FSNode)] {
        var entries = dir.fixedChildren
        switch dir {
        case .root:
            entries.append(("records", .recordDir(FSNode.recordsRoot)))
            for host in try await liveHosts() { entries.append((host.id, .host(host.id))) }
        case .kindDir(let host, let kind):
            for (name, peeked) in try await children(of: "/\(host)") where peeked.isElement(kind) {
                entries.append((name, .element(host, kind, name)))
            }
        case .recordDir(let path):
            let made = state.withLock { s in s.recordDirs.filter { $0.hasPrefix(path + "/") && !$0.dropFirst(path.count + 1).contains("/") } }
            let listed = try await children(of: path)
            for dir in made where !listed.contains(where: { path + "/" + $0.0 == dir }) {
                entries.append((String(dir.dropFirst(path.count + 1)), .recordDir(dir)))
            }
            for (name, peeked) in listed {
                switch peeked {
                case .record: entries.append((name, .record(path + "/" + name)))
                case .directory: entries.append((name, .recordDir(path + "/" + name)))
                default: break
                }
            }
        default:
            break
        }
        return entries
    }

    /// `mkdir`: an element's name, reserved in the cluster; or a directory of records, on this mount.
    public func makeDirectory(_ parent: FSNode, _ name: String) async throws(FSError) -> FSNode {
        if case .recordDir(let dir) = parent {
            let path = dir + "/" + name
            if let problem = Names.validate(path) { throw FSError(EINVAL, "\(problem)") }
            guard try await peek(path) == .missing, state.withLock({ $0.recordDirs.insert(path).inserted }) else {
                throw FSError(EEXIST, "\(path) exists")
            }
            return .recordDir(path)
        }
        guard case .kindDir(let host, let kind) = parent else {
            throw FSError(EPERM, "directories are made only under dc/proc, dc/chan, dc/select and records")
        }
        // The name is taken through Raft at once (a reservation every mount sees); writing run, cap or select makes
        // the element there.
        let path = "/\(host)/\(name)"
        var reservation = ElementView(kind: "reserved")
        reservation.reserves = kind.rawValue
        do { _ = try await client.create(path, reservation) } catch { throw FSError(error) }
        return .element(host, kind, name)
    }

    /// `rmdir`: removes an element (a running process is refused: signal it first).
    public func removeDirectory(_ parent: FSNode, _ name: String) async throws(FSError) {
        if case .recordDir(let dir) = parent {
            let path = dir + "/" + name
            if try await peek(path) == .directory { throw FSError(ENOTEMPTY, "\(path) holds records") }
            guard state.withLock({ $0.recordDirs.remove(path) }) != nil else { throw FSError(ENOENT, "no directory \(path)") }
            return
        }
        guard case .kindDir(let host, let kind) = parent else { throw FSError(EPERM, "only elements are removed with rmdir") }
        let path = "/\(host)/\(name)"
        let element: ElementView
        do { element = try await client.peek(path) } catch { throw FSError(error) }
        guard PeekedKind(element).isElement(kind) else {
            throw FSError(ENOENT, "no \(kind.rawValue) \(path)")
        }
        if kind == .proc, let phase = element.phase, phase == "pending" || phase == "running" {
            let message = "\(path) is \(phase): signal it first (echo KILL > signal), or scrub it with the CLI"
            record(path, message)
            throw FSError(EBUSY, message)
        }
        do { _ = try await client.remove(element: path) } catch { throw failure(path, any: error) }
        state.withLock { s in
            s.errors[path] = nil
            s.outcomes[path] = nil
        }
    }

    /// `unlink`: deletes a record.
    public func unlink(_ parent: FSNode, _ name: String) async throws(FSError) {
        guard case .recordDir(let dir) = parent else { throw FSError(EPERM, "only records are removed with rm") }
        do { _ = try await client.delete(dir + "/" + name) } catch { throw FSError(error) }
    }

    // MARK: - Files

    /// `open` (or `create` of a new record): a handle for reads and writes of `node`.
    public func open(_ node: FSNode, flags: Int32 = O_RDONLY, created: Bool = false) throws(FSError) -> UInt64 {
        // The files' modes are enforced here, for root too: a read-only file is never opened for writing.
        let access = flags & O_ACCMODE
        if access != O_RDONLY && node.permissions & 0o200 == 0 { throw FSError(EACCES, "not for writing") }
        if access != O_WRONLY && node.permissions & 0o400 == 0 { throw FSError(EACCES, "not for reading") }
        let handle = OpenFile(node: node, fs: self, created: created)
        return state.withLock { s in
            let id = s.nextHandle
            s.nextHandle += 1
            s.handles[id] = handle
            return id
        }
    }

    /// `create` in a records directory: a new record, written when the file is flushed.
    public func create(_ parent: FSNode, _ name: String) throws(FSError) -> (FSNode, UInt64) {
        guard case .recordDir(let dir) = parent else { throw FSError(EPERM, "files are created only under records/") }
        let path = dir + "/" + name
        if let problem = Names.validate(path) { throw FSError(EINVAL, "\(problem)") }
        let node = FSNode.record(path)
        return (node, try open(node, flags: O_WRONLY, created: true))
    }

    public func read(_ handle: UInt64, offset: Int, size: Int) async throws(FSError) -> [UInt8] {
        try await self.handle(handle).read(offset: offset, size: size)
    }

    public func write(_ handle: UInt64, _ bytes: [UInt8]) async throws(FSError) -> Int {
        try await self.handle(handle).write(bytes)
    }

    public func flush(_ handle: UInt64) async throws(FSError) {
        try await self.handle(handle).flush()
    }

    public func release(_ handle: UInt64) async {
        guard let h = state.withLock({ $0.handles.removeValue(forKey: handle) }) else { return }
        await h.release()
    }

    private func handle(_ id: UInt64) throws(FSError) -> OpenFile {
        guard let h = state.withLock({ $0.handles[id] }) else { throw FSError(EBADF, "no open file \(id)") }
        return h
    }

    // MARK: - What handles use

    /// Any error of an operation under the element at `path`, noted in its `error` file and answered as an FSError
    /// (an operation whose request was interrupted answers EINTR).
    func failure(_ path: String, any error: any Error) -> FSError {
        let e: FSError
        if Task.isCancelled {
            e = FSError(EINTR, "interrupted")
        } else if let error = error as? FSError {
            e = error
        } else if let error = error as? CircuitClientError {
            e = FSError(error)
        } else {
            e = FSError(EIO, "\(error)")
        }
        record(path, e.message)
        return e
    }

    func record(_ path: String, _ message: String) {
        state.withLock { $0.errors[path] = message }
        logger.debug("mount: \(path): \(message)")
    }

    func remember(_ path: String, _ outcome: SelectOutcomeView) { state.withLock { $0.outcomes[path] = outcome } }
    func lastOutcome(_ path: String) -> SelectOutcomeView? { state.withLock { $0.outcomes[path] } }

    func lastError(_ path: String) -> String { state.withLock { $0.errors[path] } ?? "" }

    /// The reservation at `path`, if the name is only reserved (made by mkdir, not yet given run, cap or select).
    func reservation(_ path: String) async -> ElementView? {
        guard let view = try? await client.peek(path), case .reserved = PeekedKind(view) else { return nil }
        return view
    }

    /// The element was made: the failures of its reservation are history.
    func created(_ path: String) {
        state.withLock { s in
            s.errors[path] = nil
        }
    }

    /// How long a read of the live hosts is used: every path resolution and every data operation needs the hosts
    /// (which exist, and where their APIs are), and a host that comes or goes is seen this much later at most.
    static let hostsMaxAge: Duration = .milliseconds(500)

    func liveHosts() async throws(FSError) -> [HostView] {
        let now = ContinuousClock.now
        if let cached = state.withLock({ $0.hosts }), now - cached.at < Self.hostsMaxAge { return cached.views }
        let views: [HostView]
        do { views = try await client.members(stale: true).filter { $0.state == "alive" } } catch { throw FSError(error) }
        state.withLock { $0.hosts = (views, now) }
        return views
    }

    /// The channel at `path`, spoken to at its host directly; `waiting`: for an operation that may wait long.
    func chan(_ path: String, waiting: Bool) async throws(FSError) -> Chan {
        Chan(path: path, through: try await hostClient(Names.host(of: path) ?? "", waiting: waiting))
    }

    /// A client of the API of `host` (from the live hosts, as last read); `waiting`: with the timeout of `waiting`.
    func hostClient(_ host: String, waiting: Bool = false) async throws(FSError) -> CircuitClient {
        guard let view = try await liveHosts().first(where: { $0.id == host }) else {
            throw FSError(EHOSTDOWN, "host \(host) is not alive")
        }
        var c = CircuitClient(endpoints: [view.clientAddress])
        c.timeout = waiting ? self.waiting.timeout : client.timeout
        return c
    }

    func peek(_ path: String) async throws(FSError) -> PeekedKind {
        do {
            return PeekedKind(try await client.peek(path))
        } catch {
            if case .api(let e) = error, e.code == "not_found" { return .missing }
            throw FSError(error)
        }
    }

    /// The children of `path` and what each holds, peeked at once.
    private func children(of path: String) async throws(FSError) -> [(String, PeekedKind)] {
        let names: [String]
        do {
            names = try await client.list(path).names
        } catch {
            if case .api(let e) = error, e.code == "not_found" { return [] }
            throw FSError(error)
        }
        return await withTaskGroup(of: (String, PeekedKind).self) { group in
            for name in names {
                group.addTask { (name, (try? await self.peek(path + "/" + name)) ?? .missing) }
            }
            var out: [(String, PeekedKind)] = []
            for await entry in group { out.append(entry) }
            return out.sorted { $0.0 < $1.0 }
        }
    }
}
