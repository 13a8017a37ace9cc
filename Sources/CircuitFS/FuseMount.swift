import CFuse3
import Foundation
import Logging
import Synchronization

/// The FUSE shell: a libfuse3 low-level session whose callbacks hand each request to a `CircuitFileSystem` and reply
/// when it answers. Callbacks run on libfuse's worker threads and return at once; work that needs the cluster runs
/// in a task, which replies (libfuse allows a reply from any thread, later). A request the kernel interrupts (the
/// reader was killed or pressed ^C) cancels its task, which hangs up on the cluster.
///
/// `run()` mounts and serves on the calling thread until `shutdown()` (from any other thread) or an unmount from
/// outside; then the mount is gone.
public final class FuseMount: Sendable {
    public let mountpoint: String
    let fs: CircuitFileSystem
    let logger: Logger
    /// How long the kernel may keep what a lookup or getattr answered.
    static let fixedTimeout = 1.0

    private struct Session: @unchecked Sendable { let pointer: OpaquePointer }
    private struct Shared {
        var session: Session?
        /// shutdown() was called.
        var stopping = false
        var didUnmount = false
        /// Directory listings by open directory handle.
        var listings: [UInt64: [(String, FSNode)]] = [:]
        var nextDirectory: UInt64 = 1
        /// Tasks serving requests the kernel may interrupt, by request number.
        var tasks: [UInt64: Task<Void, Never>] = [:]
        /// Tasks that ended before they were put in `tasks`.
        var finished: Set<UInt64> = []
        /// Requests interrupted before their task was put in `tasks`.
        var interruptedEarly: Set<UInt64> = []
        var nextTask: UInt64 = 1
    }
    private let shared = Mutex(Shared())

    /// Whether users other than the one who mounted may use the mount (FUSE's `allow_other`; for a user other than
    /// root, /etc/fuse.conf must have `user_allow_other`). Off by default: the mount then acts with its client
    /// identity for its owner alone, the kernel refuses everyone else, and the modes say so (group and other bits
    /// cleared).
    public let allowOther: Bool
    var modeMask: UInt32 { allowOther ? 0o777 : 0o700 }

    public init(mountpoint: String, fs: CircuitFileSystem, allowOther: Bool = false, logger: Logger) {
        self.mountpoint = mountpoint
        self.fs = fs
        self.allowOther = allowOther
        self.logger = logger
    }

    public var isMounted: Bool { shared.withLock { $0.session != nil } }

    /// Mounts and serves until shut down or unmounted. Cleans up a stale mount (a mount process that died) first.
    public func run() throws(FuseMountError) {
        try Self.prepare(mountpoint, logger: logger)
        var arguments = ["circuit", "-o", "fsname=circuit,subtype=circuit"]
        if allowOther { arguments[2] += ",allow_other" }
        let argv = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: arguments.count + 1)
        for (i, a) in arguments.enumerated() { argv[i] = strdup(a) }
        argv[arguments.count] = nil
        defer {
            for i in 0..<arguments.count { free(argv[i]) }
            argv.deallocate()
        }
        var ops = FuseOperations.table
        let userdata = Unmanaged.passRetained(self).toOpaque()
        defer { Unmanaged<FuseMount>.fromOpaque(userdata).release() }
        guard let session = circuit_fuse_session_new(Int32(arguments.count), argv, &ops, userdata) else {
            throw .failed("fuse_session_new failed (see the log for libfuse's reason)")
        }
        guard fuse_session_mount(session, mountpoint) == 0 else {
            fuse_session_destroy(session)
            throw .failed("cannot mount at \(mountpoint) (is /dev/fuse there, and are we allowed to mount?)")
        }
        let stopNow = shared.withLock { s -> Bool in
            s.session = Session(pointer: session)
            return s.stopping  // shut down before we got here
        }
        logger.info("mounted", metadata: ["mountpoint": "\(mountpoint)"])
        if !stopNow { _ = circuit_fuse_session_loop_mt(session, 16) }
        // The loop has ended. Requests still being answered are cancelled (they answer EINTR) and waited for: a reply
        // needs the session. Then unmount unless shutdown() did, and destroy here, on this thread, once.
        for task in shared.withLock({ Array($0.tasks.values) }) { task.cancel() }
        waitForAnswers(upTo: .seconds(5))
        let drained = shared.withLock { s -> Bool in
            if !s.didUnmount {
                s.didUnmount = true
                fuse_session_unmount(session)
            }
            s.session = nil
            return s.tasks.isEmpty
        }
        if drained {
            fuse_session_destroy(session)
        } else {
            logger.warning("requests still unanswered 5 s after the mount ended: the session is left undestroyed")
        }
        logger.info("unmounted", metadata: ["mountpoint": "\(mountpoint)"])
    }

    /// Cancels the requests being answered (a blocked read answers EINTR; a request that comes now is cancelled at
    /// once), waits up to 2 s for their replies, then ends the session and unmounts; `run()` returns soon after.
    /// Replies go out before the unmount, which closes the device. Any thread; more than once is harmless.
    public func shutdown() {
        let tasks = shared.withLock { s -> [Task<Void, Never>]? in
            guard !s.stopping else { return nil }
            s.stopping = true
            return Array(s.tasks.values)
        }
        guard let tasks else { return }
        for task in tasks { task.cancel() }
        let thread = Thread { [self] in
            waitForAnswers(upTo: .seconds(2))
            shared.withLock { s in
                guard let session = s.session?.pointer, !s.didUnmount else { return }
                fuse_session_exit(session)
                s.didUnmount = true
                fuse_session_unmount(session)
            }
        }
        thread.name = "fuse-shutdown"
        thread.start()
    }

    /// Blocks the calling thread (never a task's) until every request being served has been answered, or `limit`
    /// has passed.
    private func waitForAnswers(upTo limit: Duration) {
        let deadline = ContinuousClock.now + limit
        while !shared.withLock({ $0.tasks.isEmpty }) && ContinuousClock.now < deadline { usleep(5_000) }
    }

    /// Makes the mount point if it is missing; detaches a stale FUSE mount left there by a process that died (its
    /// directory answers ENOTCONN).
    static func prepare(_ mountpoint: String, logger: Logger) throws(FuseMountError) {
        var st = stat()
        if stat(mountpoint, &st) != 0 {
            let error = errno
            if error == ENOTCONN || error == ECONNABORTED {
                logger.warning("a stale mount was left at \(mountpoint): detaching it")
                if umount2(mountpoint, Int32(MNT_DETACH)) != 0 {
                    // Not root: fusermount3 (setuid) detaches a FUSE mount of the same user.
                    let why = String(cString: strerror(errno))
                    let fusermount = Process()
                    fusermount.executableURL = URL(fileURLWithPath: "/usr/bin/fusermount3")
                    fusermount.arguments = ["-uz", mountpoint]
                    var detached = false
                    if (try? fusermount.run()) != nil {
                        fusermount.waitUntilExit()
                        detached = fusermount.terminationStatus == 0
                    }
                    guard detached else {
                        throw .failed("cannot detach the stale mount at \(mountpoint): \(why)")
                    }
                }
            } else if error == ENOENT {
                if mkdir(mountpoint, 0o755) != 0 && errno != EEXIST {
                    throw .failed("cannot make \(mountpoint): \(String(cString: strerror(errno)))")
                }
            } else {
                throw .failed("cannot use \(mountpoint): \(String(cString: strerror(error)))")
            }
        }
    }

    // MARK: - What the callbacks use

    /// Runs `work` in a task the kernel can interrupt through `req`. The interrupt is registered before the task
    /// starts (once the task replies, the request is gone).
    fileprivate func serve(_ req: Request, _ work: @escaping @Sendable () async -> Void) {
        let id = shared.withLock { s -> UInt64 in
            let id = s.nextTask
            s.nextTask += 1
            return id
        }
        fuse_req_interrupt_func(req.raw, FuseOperations.interrupt, UnsafeMutableRawPointer(bitPattern: UInt(id)))
        let task = Task {
            await work()
            self.shared.withLock { s in
                if s.tasks.removeValue(forKey: id) == nil { s.finished.insert(id) }
            }
        }
        let cancel = shared.withLock { s -> Bool in
            if s.finished.remove(id) == nil { s.tasks[id] = task }
            return s.interruptedEarly.remove(id) != nil || s.stopping
        }
        if cancel { task.cancel() }
    }

    fileprivate func interrupt(_ id: UInt64) {
        let task = shared.withLock { s -> Task<Void, Never>? in
            if let task = s.tasks[id] { return task }
            s.interruptedEarly.insert(id)  // libfuse calls at once for a request interrupted before it was served
            return nil
        }
        task?.cancel()
    }

    fileprivate func openDirectory() -> UInt64 {
        shared.withLock { s in
            let id = s.nextDirectory
            s.nextDirectory += 1
            return id
        }
    }

    fileprivate func listing(_ handle: UInt64) -> [(String, FSNode)]? { shared.withLock { $0.listings[handle] } }
    fileprivate func setListing(_ handle: UInt64, _ entries: [(String, FSNode)]) {
        shared.withLock { $0.listings[handle] = entries }
    }
    fileprivate func closeDirectory(_ handle: UInt64) { _ = shared.withLock { $0.listings.removeValue(forKey: handle) } }
}

public enum FuseMountError: Error, CustomStringConvertible {
    case failed(String)
    public var description: String {
        switch self {
        case .failed(let why): return why
        }
    }
}

/// A request, carried to the task that answers it.
struct Request: @unchecked Sendable {
    let raw: fuse_req_t?
}

/// The callbacks: static and non-capturing (libfuse calls them on its own threads; nothing here is actor-isolated).
enum FuseOperations {
    static var table: fuse_lowlevel_ops {
        var ops = fuse_lowlevel_ops()
        ops.lookup = lookup
        ops.forget = forget
        ops.forget_multi = forgetMulti
        ops.getattr = getattr
        ops.setattr = setattr
        ops.mkdir = mkdir
        ops.rmdir = rmdir
        ops.unlink = unlink
        ops.create = create
        ops.open = open
        ops.read = read
        ops.write = write
        ops.flush = flush
        ops.release = release
        ops.opendir = opendir
        ops.readdir = readdir
        ops.releasedir = releasedir
        return ops
    }

    static func mount(_ req: fuse_req_t?) -> FuseMount {
        Unmanaged<FuseMount>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue()
    }

    static let interrupt: @convention(c) (fuse_req_t?, UnsafeMutableRawPointer?) -> Void = { req, data in
        mount(req).interrupt(UInt64(UInt(bitPattern: data)))
    }

    static func attributes(_ node: FSNode, _ inode: UInt64, in m: FuseMount) -> stat {
        var st = stat()
        st.st_ino = UInt(inode)
        st.st_mode = (node.isDirectory ? S_IFDIR : S_IFREG) | (node.permissions & m.modeMask)
        st.st_nlink = node.isDirectory ? 2 : 1
        st.st_uid = getuid()
        st.st_gid = getgid()
        st.st_size = 0
        st.st_blksize = 4096
        let now = timespec(tv_sec: time(nil), tv_nsec: 0)
        st.st_atim = now
        st.st_mtim = now
        st.st_ctim = now
        return st
    }

    /// What the kernel is told of `node` at `inode` in a lookup, mkdir or create. It keeps names and attributes a
    /// second: a host, element or record removed elsewhere may still resolve here for that long; every operation on
    /// it then fails as the cluster says (ENOENT), and what this mount removes it forgets at once.
    static func entry(_ node: FSNode, _ inode: UInt64, in m: FuseMount) -> fuse_entry_param {
        var entry = fuse_entry_param()
        entry.ino = inode
        entry.generation = 1
        entry.attr = attributes(node, inode, in: m)
        entry.attr_timeout = FuseMount.fixedTimeout
        entry.entry_timeout = FuseMount.fixedTimeout
        return entry
    }

    static func replyEntry(_ req: Request, _ m: FuseMount, _ node: FSNode) {
        let inode = m.fs.lookUp(node)
        var entry = entry(node, inode, in: m)
        if fuse_reply_entry(req.raw, &entry) != 0 { m.fs.forget(inode, count: 1) }
    }

    static func replyError(_ req: Request, _ error: any Error) {
        fuse_reply_err(req.raw, (error as? FSError)?.errno ?? EIO)
    }

    static func name(_ pointer: UnsafePointer<CChar>?) -> String { pointer.map { String(cString: $0) } ?? "" }

    /// An operation on the entry `name` of the directory `parent`, answered from a task by `answer`.
    static func inDirectory(
        _ raw: fuse_req_t?, _ parent: fuse_ino_t, _ namePointer: UnsafePointer<CChar>?,
        _ answer: @escaping @Sendable (Request, FuseMount, FSNode, String) async throws -> Void
    ) {
        let req = Request(raw: raw)
        let m = mount(raw)
        let name = name(namePointer)
        guard let dir = m.fs.node(parent) else { return replyError(req, FSError(ENOENT, "stale directory")) }
        m.serve(req) {
            do { try await answer(req, m, dir, name) } catch { replyError(req, error) }
        }
    }

    static let lookup: @convention(c) (fuse_req_t?, fuse_ino_t, UnsafePointer<CChar>?) -> Void = { raw, parent, name in
        inDirectory(raw, parent, name) { req, m, dir, name in replyEntry(req, m, try await m.fs.lookup(dir, name)) }
    }

    static let forget: @convention(c) (fuse_req_t?, fuse_ino_t, UInt64) -> Void = { raw, inode, count in
        mount(raw).fs.forget(inode, count: count)
        fuse_reply_none(raw)
    }

    static let forgetMulti: @convention(c) (fuse_req_t?, Int, UnsafeMutablePointer<fuse_forget_data>?) -> Void = {
        raw, count, forgets in
        let m = mount(raw)
        for i in 0..<count { if let f = forgets?[i] { m.fs.forget(f.ino, count: f.nlookup) } }
        fuse_reply_none(raw)
    }

    static let getattr: @convention(c) (fuse_req_t?, fuse_ino_t, UnsafeMutablePointer<fuse_file_info>?) -> Void = {
        raw, inode, _ in
        guard let node = mount(raw).fs.node(inode) else { return replyError(Request(raw: raw), FSError(ENOENT, "stale")) }
        var st = attributes(node, inode, in: mount(raw))
        fuse_reply_attr(raw, &st, FuseMount.fixedTimeout)
    }

    /// Truncation and times are accepted and change nothing (the files hold no bytes of their own).
    static let setattr:
        @convention(c) (fuse_req_t?, fuse_ino_t, UnsafeMutablePointer<stat>?, Int32, UnsafeMutablePointer<fuse_file_info>?) -> Void = {
            raw, inode, _, _, _ in
            guard let node = mount(raw).fs.node(inode) else { return replyError(Request(raw: raw), FSError(ENOENT, "stale")) }
            var st = attributes(node, inode, in: mount(raw))
            fuse_reply_attr(raw, &st, 0)
        }

    static let mkdir: @convention(c) (fuse_req_t?, fuse_ino_t, UnsafePointer<CChar>?, mode_t) -> Void = { raw, parent, name, _ in
        inDirectory(raw, parent, name) { req, m, dir, name in replyEntry(req, m, try await m.fs.makeDirectory(dir, name)) }
    }

    static let rmdir: @convention(c) (fuse_req_t?, fuse_ino_t, UnsafePointer<CChar>?) -> Void = { raw, parent, name in
        inDirectory(raw, parent, name) { req, m, dir, name in
            try await m.fs.removeDirectory(dir, name)
            fuse_reply_err(req.raw, 0)
        }
    }

    static let unlink: @convention(c) (fuse_req_t?, fuse_ino_t, UnsafePointer<CChar>?) -> Void = { raw, parent, name in
        inDirectory(raw, parent, name) { req, m, dir, name in
            try await m.fs.unlink(dir, name)
            fuse_reply_err(req.raw, 0)
        }
    }

    static let create:
        @convention(c) (fuse_req_t?, fuse_ino_t, UnsafePointer<CChar>?, mode_t, UnsafeMutablePointer<fuse_file_info>?) -> Void = {
            raw, parent, namePointer, _, fi in
            let req = Request(raw: raw)
            let m = mount(raw)
            guard let dir = m.fs.node(parent) else { return replyError(req, FSError(ENOENT, "stale directory")) }
            do {
                let (node, handle) = try m.fs.create(dir, name(namePointer))
                let inode = m.fs.lookUp(node)
                var entry = entry(node, inode, in: m)
                circuit_fuse_set_direct_io(fi, handle)
                if fuse_reply_create(raw, &entry, fi) != 0 {
                    m.fs.forget(inode, count: 1)
                    Task { await m.fs.release(handle) }
                }
            } catch {
                replyError(req, error)
            }
        }

    static let open: @convention(c) (fuse_req_t?, fuse_ino_t, UnsafeMutablePointer<fuse_file_info>?) -> Void = { raw, inode, fi in
        let m = mount(raw)
        guard let node = m.fs.node(inode) else { return replyError(Request(raw: raw), FSError(ENOENT, "stale")) }
        guard !node.isDirectory else { return replyError(Request(raw: raw), FSError(EISDIR, "a directory")) }
        do {
            let handle = try m.fs.open(node, flags: circuit_fuse_flags(fi))
            circuit_fuse_set_direct_io(fi, handle)
            if fuse_reply_open(raw, fi) != 0 { Task { await m.fs.release(handle) } }
        } catch {
            replyError(Request(raw: raw), error)
        }
    }

    static let read: @convention(c) (fuse_req_t?, fuse_ino_t, Int, off_t, UnsafeMutablePointer<fuse_file_info>?) -> Void = {
        raw, _, size, offset, fi in
        let req = Request(raw: raw)
        let m = mount(raw)
        let handle = circuit_fuse_fh(fi)
        m.serve(req) {
            do {
                let bytes = try await m.fs.read(handle, offset: Int(offset), size: size)
                _ = bytes.withUnsafeBufferPointer { b in
                    b.withMemoryRebound(to: CChar.self) { fuse_reply_buf(req.raw, $0.baseAddress, $0.count) }
                }
            } catch {
                replyError(req, error)
            }
        }
    }

    static let write:
        @convention(c) (fuse_req_t?, fuse_ino_t, UnsafePointer<CChar>?, Int, off_t, UnsafeMutablePointer<fuse_file_info>?) -> Void = {
            raw, _, buffer, size, _, fi in
            let req = Request(raw: raw)
            let m = mount(raw)
            let handle = circuit_fuse_fh(fi)
            let bytes = buffer.map { Array(UnsafeRawBufferPointer(start: $0, count: size)) } ?? []
            m.serve(req) {
                do {
                    let n = try await m.fs.write(handle, bytes)
                    fuse_reply_write(req.raw, n)
                } catch {
                    replyError(req, error)
                }
            }
        }

    static let flush: @convention(c) (fuse_req_t?, fuse_ino_t, UnsafeMutablePointer<fuse_file_info>?) -> Void = { raw, _, fi in
        let req = Request(raw: raw)
        let m = mount(raw)
        let handle = circuit_fuse_fh(fi)
        m.serve(req) {
            do {
                try await m.fs.flush(handle)
                fuse_reply_err(req.raw, 0)
            } catch {
                replyError(req, error)
            }
        }
    }

    static let release: @convention(c) (fuse_req_t?, fuse_ino_t, UnsafeMutablePointer<fuse_file_info>?) -> Void = { raw, _, fi in
        let m = mount(raw)
        let handle = circuit_fuse_fh(fi)
        fuse_reply_err(raw, 0)
        Task { await m.fs.release(handle) }
    }

    static let opendir: @convention(c) (fuse_req_t?, fuse_ino_t, UnsafeMutablePointer<fuse_file_info>?) -> Void = { raw, _, fi in
        let m = mount(raw)
        fi?.pointee.fh = m.openDirectory()
        fuse_reply_open(raw, fi)
    }

    static let readdir: @convention(c) (fuse_req_t?, fuse_ino_t, Int, off_t, UnsafeMutablePointer<fuse_file_info>?) -> Void = {
        raw, inode, size, offset, fi in
        let req = Request(raw: raw)
        let m = mount(raw)
        let handle = circuit_fuse_fh(fi)
        guard let node = m.fs.node(inode) else { return replyError(req, FSError(ENOENT, "stale")) }
        m.serve(req) {
            var entries: [(String, FSNode)]
            if let listed = m.listing(handle) {
                entries = listed
            } else {
                do {
                    entries = [(".", node), ("..", .root)] + (try await m.fs.list(node))
                } catch {
                    return replyError(req, error)
                }
                m.setListing(handle, entries)
            }
            var buffer = [CChar](repeating: 0, count: size)
            var used = 0
            var index = Int(offset)
            while index < entries.count {
                let (name, child) = entries[index]
                var st = attributes(child, m.fs.entryInode(child), in: m)
                let needed = buffer.withUnsafeMutableBufferPointer { b in
                    fuse_add_direntry(req.raw, b.baseAddress! + used, size - used, name, &st, off_t(index + 1))
                }
                if needed > size - used { break }
                used += needed
                index += 1
            }
            _ = buffer.withUnsafeBufferPointer { fuse_reply_buf(req.raw, $0.baseAddress, used) }
        }
    }

    static let releasedir: @convention(c) (fuse_req_t?, fuse_ino_t, UnsafeMutablePointer<fuse_file_info>?) -> Void = { raw, _, fi in
        mount(raw).closeDirectory(circuit_fuse_fh(fi))
        fuse_reply_err(raw, 0)
    }
}
