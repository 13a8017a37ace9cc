import CircuitClient
import CircuitNode
import Foundation
import NIOCore
import NIOPosix
import Synchronization

/// ZooKeeper as Debian ships it (`apt-get install zookeeper`): three `QuorumPeerMain` JVMs on loopback, each with its
/// own folder under `base` (`zkN/zoo.cfg`, `zkN/zookeeper.log`, `zkN/data` for myid, snapshots and the transaction
/// log), the example settings of /etc/zookeeper/conf_example (tickTime 2000, initLimit 10, syncLimit 5, forceSync on),
/// driven by the minimal jute client below.
final class ZooKeeperSystem: ComparedSystem {
    let name = "ZooKeeper"
    let version: String
    let base: String

    private struct Member: Sendable {
        let folder: String
        let clientPort: Int
        var process: Process?
        var data: String { folder + "/data" }
    }

    private let members = Mutex<[Member]>([])
    private let java: String?
    private let classpath: String?

    private static let jar = "/usr/share/java/zookeeper.jar"

    init(base: String) {
        self.base = base
        self.java = Self.findJava()
        let fm = FileManager.default
        if fm.fileExists(atPath: Self.jar) {
            // The jar's manifest names its dependencies (Debian); slf4j's log4j binding, when present, lets the server
            // log into its folder through the log4j.properties written there (without it slf4j logs nothing).
            let logging = ["/usr/share/java/slf4j-log4j12.jar", "/usr/share/java/log4j-1.2.jar"]
            classpath = ([Self.jar] + (logging.allSatisfy { fm.fileExists(atPath: $0) } ? logging : [])).joined(separator: ":")
        } else {
            classpath = nil
        }
        version = Self.installedVersion()
    }

    func start() async throws {
        guard java != nil, classpath != nil else {
            throw ComparedError("ZooKeeper is not installed (no java on PATH or no \(Self.jar)): apt-get install zookeeper")
        }
        var ports: [(client: Int, quorum: Int, election: Int)] = []
        for _ in 0..<3 {
            let client = try freePort(in: cliPortRange)
            let quorum = try freePort(in: cliPortRange)
            let election = try freePort(in: cliPortRange)
            ports.append((client: client, quorum: quorum, election: election))
        }
        let servers = ports.indices.map { "server.\($0 + 1)=127.0.0.1:\(ports[$0].quorum):\(ports[$0].election)" }
        var made: [Member] = []
        for i in 0..<3 {
            let folder = "\(base)/zk\(i + 1)"
            try FileManager.default.createDirectory(atPath: folder + "/data", withIntermediateDirectories: true)
            try "\(i + 1)\n".write(toFile: folder + "/data/myid", atomically: true, encoding: .utf8)
            let config = [
                "# circuit bench compare: the example settings of /etc/zookeeper/conf_example/zoo.cfg on loopback ports.",
                "tickTime=2000", "initLimit=10", "syncLimit=5",
                "dataDir=\(folder)/data",
                "clientPort=\(ports[i].client)", "clientPortAddress=127.0.0.1",
                "# Every bench client connects from 127.0.0.1: the default limit of 60 per address would refuse some.",
                "maxClientCnxns=0",
                "admin.enableServer=false",
                "4lw.commands.whitelist=srvr,mntr,ruok",
            ] + servers
            try (config.joined(separator: "\n") + "\n").write(toFile: folder + "/zoo.cfg", atomically: true, encoding: .utf8)
            let log4j = [
                "log4j.rootLogger=INFO, FILE",
                "log4j.appender.FILE=org.apache.log4j.FileAppender",
                "log4j.appender.FILE.File=\(folder)/zookeeper.log",
                "log4j.appender.FILE.layout=org.apache.log4j.PatternLayout",
                "log4j.appender.FILE.layout.ConversionPattern=%d{ISO8601} %-5p [%t:%C{1}@%L] - %m%n",
            ]
            try (log4j.joined(separator: "\n") + "\n").write(toFile: folder + "/log4j.properties", atomically: true, encoding: .utf8)
            made.append(Member(folder: folder, clientPort: ports[i].client, process: nil))
        }
        members.withLock { $0 = made }
        for i in 0..<3 { try launch(i) }
        let deadline = ContinuousClock().now + .seconds(60)
        for i in 0..<3 { try await awaitWrite(i, deadline: deadline) }
    }

    func stop() {
        for i in 0..<members.withLock({ $0.count }) { kill9(i) }
    }

    func connect(_ member: Int) async throws -> any ComparedConnection {
        let port = try self.member(member).clientPort
        return try await ZKConnection.connect(port: port)
    }

    func leader() async throws -> Int {
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(10)
        var said: [String] = []
        repeat {
            said = []
            for (i, m) in members.withLock({ $0 }).enumerated() where m.process != nil {
                do {
                    let text = try await ZKFourLetterWord.ask("srvr", port: m.clientPort)
                    if text.contains("Mode: leader") { return i }
                    let mode = text.split(separator: "\n").first(where: { $0.hasPrefix("Mode:") }) ?? text.prefix(80)
                    said.append("member \(i): \(mode)")
                } catch {
                    said.append("member \(i): \(error)")
                }
            }
            try await Task.sleep(for: .milliseconds(100))
        } while clock.now < deadline
        throw ComparedError("no ZooKeeper member said Mode: leader within 10 s (\(said.joined(separator: "; ")))")
    }

    func kill9(_ member: Int) {
        guard let process = take(member) else { return }
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    func restart(_ member: Int) async throws {
        if try self.member(member).process == nil { try launch(member) }
        try await awaitWrite(member, deadline: ContinuousClock().now + .seconds(60))
    }

    func residentBytes(_ member: Int) -> Int {
        guard let process = try? self.member(member).process else { return 0 }
        return CircuitNode.residentBytes(of: process.processIdentifier)
    }

    /// Allocated blocks under the member's dataDir (myid, snapshots, transaction logs): the transaction log is
    /// preallocated in 64 MB steps by writing its last byte, so its length overstates what it takes.
    func diskBytes(_ member: Int) -> Int {
        guard let folder = try? self.member(member).data else { return 0 }
        return allocatedBytes(under: folder)
    }

    // MARK: - Processes

    private func member(_ i: Int) throws -> Member {
        guard let m = members.withLock({ $0.indices.contains(i) ? $0[i] : nil }) else {
            throw ComparedError("ZooKeeper member \(i) does not exist (not started?)")
        }
        return m
    }

    /// Forgets member `i`'s process and hands it over (nil if none runs).
    private func take(_ i: Int) -> Process? {
        members.withLock { list in
            guard list.indices.contains(i) else { return nil }
            let process = list[i].process
            list[i].process = nil
            return process
        }
    }

    private func launch(_ i: Int) throws {
        guard let java, let classpath else {
            throw ComparedError("ZooKeeper is not installed (no java on PATH or no \(Self.jar)): apt-get install zookeeper")
        }
        let m = try member(i)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: java)
        // The heap of Debian's zkEnv.sh (ZK_SERVER_HEAP=1000); the log goes to the folder, not to our output.
        process.arguments = [
            "-Xmx1000m", "-Dzookeeper.log.dir=\(m.folder)", "-Dlog4j.configuration=file:\(m.folder)/log4j.properties",
            "-cp", classpath, "org.apache.zookeeper.server.quorum.QuorumPeerMain", "\(m.folder)/zoo.cfg",
        ]
        process.currentDirectoryURL = URL(fileURLWithPath: m.folder)
        let out = m.folder + "/zookeeper.out"
        if !FileManager.default.fileExists(atPath: out) { _ = FileManager.default.createFile(atPath: out, contents: nil) }
        let handle = FileHandle(forWritingAtPath: out)
        _ = try? handle?.seekToEnd()
        process.standardOutput = handle ?? FileHandle.nullDevice
        process.standardError = handle ?? FileHandle.nullDevice
        process.standardInput = FileHandle.nullDevice
        try process.run()
        try? handle?.close()  // the JVM has its own copy
        members.withLock { $0[i].process = process }
    }

    /// Returns once a session on member `i` is established and a write through it succeeds (creating /bench).
    private func awaitWrite(_ i: Int, deadline: ContinuousClock.Instant) async throws {
        let clock = ContinuousClock()
        var last = "no attempt"
        while true {
            let m = try member(i)
            if let p = m.process, !p.isRunning {
                throw ComparedError("ZooKeeper member \(i) exited with status \(p.terminationStatus); \(m.folder) ends:\n\(logTail(m.folder))")
            }
            do {
                let connection = try await ZKConnection.connect(port: m.clientPort)
                do {
                    try await connection.touchBench()
                    await connection.close()
                    return
                } catch {
                    await connection.close()
                    throw error
                }
            } catch {
                last = "\(error)"
            }
            guard clock.now < deadline else {
                throw ComparedError("ZooKeeper member \(i) took no write in time (last: \(last)); \(m.folder) ends:\n\(logTail(m.folder))")
            }
            try await Task.sleep(for: .milliseconds(200))
        }
    }

    private func logTail(_ folder: String) -> String {
        ["zookeeper.out", "zookeeper.log"].map { file in
            let text = (try? String(contentsOfFile: "\(folder)/\(file)", encoding: .utf8)) ?? ""
            return "--- \(file):\n" + text.split(separator: "\n").suffix(10).joined(separator: "\n")
        }.joined(separator: "\n")
    }

    private static func findJava() -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        for dir in path.split(separator: ":").map(String.init) + ["/usr/bin"]
        where FileManager.default.isExecutableFile(atPath: dir + "/java") {
            return dir + "/java"
        }
        return nil
    }

    /// "ZooKeeper 3.8.0", from Debian's versioned link /usr/share/java/zookeeper-3.8.0.jar.
    private static func installedVersion() -> String {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/usr/share/java")) ?? []
        for name in names.sorted() where name.hasPrefix("zookeeper-") && name.hasSuffix(".jar") {
            let v = name.dropFirst("zookeeper-".count).dropLast(".jar".count)
            if v.first?.isNumber == true { return "ZooKeeper \(v)" }
        }
        return "ZooKeeper"
    }
}

// MARK: - The jute wire protocol

/// Operation codes (ZooDefs.OpCode).
private enum ZKOp {
    static let create: Int32 = 1
    static let exists: Int32 = 3
    static let getData: Int32 = 4
    static let setData: Int32 = 5
    static let sync: Int32 = 9
    static let ping: Int32 = 11
    static let closeSession: Int32 = -11
}

/// Reply error codes (KeeperException.Code); a reply with an error has no body.
private enum ZKErr {
    static let ok: Int32 = 0
    static let noNode: Int32 = -101
    static let badVersion: Int32 = -103
    static let nodeExists: Int32 = -110

    static func error(_ code: Int32, _ op: String, _ path: String) -> ComparedError {
        let names: [Int32: String] = [
            -1: "SystemError", -4: "ConnectionLoss", -5: "MarshallingError", -7: "OperationTimeout", -8: "BadArguments",
            -101: "NoNode", -102: "NoAuth", -103: "BadVersion", -110: "NodeExists", -112: "SessionExpired",
            -114: "InvalidACL", -118: "SessionMoved", -119: "NotReadOnly",
        ]
        return ComparedError("ZooKeeper \(op) \(path): \(names[code] ?? "error") (\(code))")
    }
}

/// Watcher event types (Watcher.Event.EventType).
private enum ZKEvent {
    static let nodeCreated: Int32 = 1
    static let nodeDeleted: Int32 = 2
    static let nodeDataChanged: Int32 = 3
}

/// One reply: the ReplyHeader's err and what follows the header.
private struct ZKReply: Sendable {
    let err: Int32
    let body: ByteBuffer
}

/// What the connection hands its handler; the handler assigns the xid.
private enum ZKOutbound: Sendable {
    case request(op: Int32, body: ByteBuffer, reply: EventLoopPromise<ZKReply>)
    case ping
}

extension ByteBuffer {
    fileprivate mutating func writeJuteString(_ s: String) {
        writeInteger(Int32(s.utf8.count))
        writeString(s)
    }

    fileprivate mutating func writeJuteBytes(_ bytes: [UInt8]) {
        writeInteger(Int32(bytes.count))
        writeBytes(bytes)
    }

    fileprivate mutating func writeJuteBool(_ value: Bool) {
        writeInteger(UInt8(value ? 1 : 0))
    }

    fileprivate mutating func readJuteString() -> String? {
        guard let length = readInteger(as: Int32.self) else { return nil }
        if length < 0 { return "" }
        return readString(length: Int(length))
    }

    /// Stat.version of a Stat at the reader index (czxid, mzxid, ctime, mtime come first: 32 bytes).
    fileprivate func statVersion() throws -> Int32 {
        guard let version = getInteger(at: readerIndex + 32, as: Int32.self) else {
            throw ComparedError("ZooKeeper sent a short Stat")
        }
        return version
    }
}

private enum ZKWire {
    /// Requests without a reply by then close the connection (a member that hangs must not hang the bench).
    static let requestTimeout = TimeAmount.seconds(10)

    static func send(
        _ channel: any Channel, _ op: Int32, _ body: ByteBuffer, timeout: TimeAmount = ZKWire.requestTimeout
    ) -> EventLoopFuture<ZKReply> {
        let reply = channel.eventLoop.makePromise(of: ZKReply.self)
        let timer = channel.eventLoop.scheduleTask(in: timeout) {
            reply.fail(ComparedError("ZooKeeper: no reply within \(timeout.nanoseconds / 1_000_000) ms"))
            channel.close(promise: nil)
        }
        reply.futureResult.whenComplete { _ in timer.cancel() }
        channel.writeAndFlush(ZKOutbound.request(op: op, body: body, reply: reply)).whenFailure { reply.fail($0) }
        return reply.futureResult
    }

    /// GetDataRequest / ExistsRequest (path, watch) or, without `watch`, SyncRequest (path).
    static func pathBody(_ path: String, watch: Bool? = nil) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeJuteString(path)
        if let watch { b.writeJuteBool(watch) }
        return b
    }

    /// SetDataRequest: path, data, expected version (-1: any).
    static func setDataBody(_ path: String, _ value: [UInt8], version: Int32) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeJuteString(path)
        b.writeJuteBytes(value)
        b.writeInteger(version)
        return b
    }

    /// CreateRequest: path, data, ACL world:anyone with all permissions (OPEN_ACL_UNSAFE), flags 0 (persistent).
    static func createBody(_ path: String, _ value: [UInt8]) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeJuteString(path)
        b.writeJuteBytes(value)
        b.writeInteger(Int32(1))
        b.writeInteger(Int32(31))
        b.writeJuteString("world")
        b.writeJuteString("anyone")
        b.writeInteger(Int32(0))
        return b
    }

    /// Sets a watch on `path`: a data watch through getData, or, if the node does not exist, an exists watch that
    /// fires when it is created.
    static func arm(_ path: String, on channel: any Channel) -> EventLoopFuture<Void> {
        send(channel, ZKOp.getData, pathBody(path, watch: true)).flatMap { reply -> EventLoopFuture<Void> in
            switch reply.err {
            case ZKErr.ok:
                return channel.eventLoop.makeSucceededVoidFuture()
            case ZKErr.noNode:
                return send(channel, ZKOp.exists, pathBody(path, watch: true)).flatMapThrowing { exists in
                    guard exists.err == ZKErr.ok || exists.err == ZKErr.noNode else {
                        throw ZKErr.error(exists.err, "exists", path)
                    }
                }
            default:
                return channel.eventLoop.makeFailedFuture(ZKErr.error(reply.err, "getData", path))
            }
        }
    }
}

/// 4-byte big-endian length + payload; the handler gets the payload.
private struct ZKFrameDecoder: ByteToMessageDecoder {
    typealias InboundOut = ByteBuffer

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: Int32.self) else { return .needMoreData }
        guard length >= 0, length <= 16 << 20 else { throw ComparedError("ZooKeeper sent a frame of \(length) bytes") }
        guard buffer.readableBytes >= 4 + Int(length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: 4)
        context.fireChannelRead(Self.wrapInboundOut(buffer.readSlice(length: Int(length))!))
        return .continue
    }

    mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue {}
        return .needMoreData
    }
}

/// Watched paths and their callbacks, shared by a connection and its handler.
private final class ZKWatches: Sendable {
    private let callbacks = Mutex<[String: @Sendable () -> Void]>([:])

    func add(_ path: String, _ changed: @escaping @Sendable () -> Void) {
        callbacks.withLock { $0[path] = changed }
    }

    func remove(_ path: String) {
        callbacks.withLock { _ = $0.removeValue(forKey: path) }
    }

    /// A WatcherEvent arrived (on the event loop): ZooKeeper's watches fire once, so this re-arms it. Writes between
    /// the event and the re-arming are not reported: ZooKeeper says nothing of them.
    func fire(type: Int32, path: String, on channel: any Channel) {
        guard type == ZKEvent.nodeDataChanged || type == ZKEvent.nodeCreated || type == ZKEvent.nodeDeleted,
            let changed = callbacks.withLock({ $0[path] })
        else { return }
        changed()
        // A watch that cannot be re-armed would go quiet: close, so the connection's next use fails instead.
        ZKWire.arm(path, on: channel).whenFailure { _ in channel.close(promise: nil) }
    }
}

/// Sends the ConnectRequest, then frames requests with xids and completes each request's promise with the reply of
/// the same xid; replies to pings (xid -2) are dropped, notifications (xid -1) go to the watches.
private final class ZKHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ZKOutbound
    typealias OutboundOut = ByteBuffer

    private let sessionTimeoutMillis: Int32
    private let watches: ZKWatches
    /// Completed with the negotiated session timeout by the ConnectResponse.
    private var handshake: EventLoopPromise<Int32>?
    private var pending: [Int32: EventLoopPromise<ZKReply>] = [:]
    private var nextXid: Int32 = 1
    private var closed = false

    init(sessionTimeoutMillis: Int32, handshake: EventLoopPromise<Int32>, watches: ZKWatches) {
        self.sessionTimeoutMillis = sessionTimeoutMillis
        self.handshake = handshake
        self.watches = watches
    }

    func channelActive(context: ChannelHandlerContext) {
        // ConnectRequest: protocolVersion 0, lastZxidSeen 0, timeOut, sessionId 0 (a new session), passwd of 16
        // zero bytes, readOnly false.
        var b = context.channel.allocator.buffer(capacity: 49)
        b.writeInteger(Int32(45))
        b.writeInteger(Int32(0))
        b.writeInteger(Int64(0))
        b.writeInteger(sessionTimeoutMillis)
        b.writeInteger(Int64(0))
        b.writeJuteBytes([UInt8](repeating: 0, count: 16))
        b.writeJuteBool(false)
        context.writeAndFlush(Self.wrapOutboundOut(b), promise: nil)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var frame = Self.unwrapInboundIn(data)
        if let handshake {
            // ConnectResponse: protocolVersion, timeOut, sessionId, passwd, readOnly. A member that does not serve
            // (no quorum) closes the connection instead.
            self.handshake = nil
            guard frame.readInteger(as: Int32.self) != nil, let timeout = frame.readInteger(as: Int32.self), timeout > 0 else {
                handshake.fail(ComparedError("ZooKeeper refused the session"))
                context.close(promise: nil)
                return
            }
            handshake.succeed(timeout)
            return
        }
        // ReplyHeader: xid, zxid, err.
        guard let xid = frame.readInteger(as: Int32.self), frame.readInteger(as: Int64.self) != nil,
            let err = frame.readInteger(as: Int32.self)
        else {
            failAll(ComparedError("ZooKeeper sent a short reply header"))
            context.close(promise: nil)
            return
        }
        switch xid {
        case -1:
            // WatcherEvent: type, state, path.
            if let type = frame.readInteger(as: Int32.self), frame.readInteger(as: Int32.self) != nil,
                let path = frame.readJuteString()
            {
                watches.fire(type: type, path: path, on: context.channel)
            }
        case -2:
            break
        default:
            pending.removeValue(forKey: xid)?.succeed(ZKReply(err: err, body: frame))
        }
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        var b = context.channel.allocator.buffer(capacity: 64)
        b.writeInteger(Int32(0))  // the length, set below
        switch Self.unwrapOutboundIn(data) {
        case .ping:
            b.writeInteger(Int32(-2))
            b.writeInteger(ZKOp.ping)
        case .request(let op, let body, let reply):
            guard !closed else {
                let error = ComparedError("ZooKeeper connection closed")
                reply.fail(error)
                promise?.fail(error)
                return
            }
            let xid = nextXid
            nextXid = nextXid == Int32.max ? 1 : nextXid + 1
            pending[xid] = reply
            b.writeInteger(xid)
            b.writeInteger(op)
            b.writeImmutableBuffer(body)
        }
        b.setInteger(Int32(b.readableBytes - 4), at: b.readerIndex)
        context.write(Self.wrapOutboundOut(b), promise: promise)
    }

    func channelInactive(context: ChannelHandlerContext) {
        failAll(ComparedError("ZooKeeper closed the connection"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        failAll(error)
        context.close(promise: nil)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        failAll(ComparedError("ZooKeeper connection closed"))
    }

    private func failAll(_ error: any Error) {
        closed = true
        let handshake = self.handshake
        self.handshake = nil
        handshake?.fail(error)
        let waiting = pending
        pending = [:]
        for promise in waiting.values { promise.fail(error) }
    }
}

/// One ZooKeeper session on one TCP connection to one member.
private final class ZKConnection: ComparedConnection {
    static let sessionTimeoutMillis: Int32 = 10_000

    let channel: any Channel
    let watches: ZKWatches
    let pings: RepeatedTask

    let taskExecutor: any TaskExecutor

    private init(channel: any Channel, watches: ZKWatches, pings: RepeatedTask) {
        self.channel = channel
        self.watches = watches
        self.pings = pings
        self.taskExecutor = EventLoopTaskExecutor(channel.eventLoop)
    }

    /// Connects and establishes a new session; fails if the member does not serve (it closes the connection).
    static func connect(port: Int) async throws -> ZKConnection {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let handshake = loop.makePromise(of: Int32.self)
        let watches = ZKWatches()
        let timeout = sessionTimeoutMillis
        let channel: any Channel
        do {
            channel = try await ClientBootstrap(group: loop)
                .connectTimeout(.seconds(3))
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(ZKFrameDecoder()))
                        try channel.pipeline.syncOperations.addHandler(
                            ZKHandler(sessionTimeoutMillis: timeout, handshake: handshake, watches: watches))
                    }
                }
                .connect(host: "127.0.0.1", port: port).get()
        } catch {
            handshake.fail(error)
            throw error
        }
        let expiry = loop.scheduleTask(in: .seconds(5)) {
            handshake.fail(ComparedError("ZooKeeper on port \(port): no session within 5 s"))
            channel.close(promise: nil)
        }
        let negotiated: Int32
        do {
            negotiated = try await handshake.futureResult.get()
            expiry.cancel()
        } catch {
            expiry.cancel()
            try? await channel.close().get()
            throw error
        }
        // Pings at a third of the session timeout keep the session alive through idle stretches (a watcher waiting,
        // the pause between rounds), as ZooKeeper's own client does.
        let interval = TimeAmount.milliseconds(Int64(max(negotiated / 3, 100)))
        let pings = loop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { _ in
            channel.writeAndFlush(ZKOutbound.ping, promise: nil)
        }
        channel.closeFuture.whenComplete { _ in pings.cancel() }
        return ZKConnection(channel: channel, watches: watches, pings: pings)
    }

    /// The znode of a bench key: keys are `/bench/k00000042` already; anything else goes under /bench too.
    static func path(_ key: String) -> String {
        if key.hasPrefix("/bench/"), key.count > 7, !key.dropFirst(7).contains("/") { return key }
        return "/bench/" + key.replacingOccurrences(of: "/", with: "_")
    }

    private func call(_ op: Int32, _ body: ByteBuffer) async throws -> ZKReply {
        try await ZKWire.send(channel, op, body).get()
    }

    /// Creates /bench if needed, then writes it: a write that went through the leader.
    func touchBench() async throws {
        let created = try await call(ZKOp.create, ZKWire.createBody("/bench", []))
        guard created.err == ZKErr.ok || created.err == ZKErr.nodeExists else {
            throw ZKErr.error(created.err, "create", "/bench")
        }
        let set = try await call(ZKOp.setData, ZKWire.setDataBody("/bench", [], version: -1))
        guard set.err == ZKErr.ok else { throw ZKErr.error(set.err, "setData", "/bench") }
    }

    func put(_ key: String, _ value: [UInt8]) async throws {
        let path = Self.path(key)
        // setData, or create if there is no node yet; another client may create it in between: set again.
        for _ in 0..<4 {
            let set = try await call(ZKOp.setData, ZKWire.setDataBody(path, value, version: -1))
            if set.err == ZKErr.ok { return }
            guard set.err == ZKErr.noNode else { throw ZKErr.error(set.err, "setData", path) }
            let created = try await call(ZKOp.create, ZKWire.createBody(path, value))
            if created.err == ZKErr.ok { return }
            guard created.err == ZKErr.nodeExists else { throw ZKErr.error(created.err, "create", path) }
        }
        throw ComparedError("ZooKeeper put \(path): the node kept appearing and disappearing")
    }

    func read(_ key: String) async throws -> Int64 {
        let path = Self.path(key)
        // sync then getData, sent together: a session's requests are answered in order and the member holds the
        // read until the sync has come back from the leader, so waiting for the sync first would only add a round
        // trip.
        let synced = ZKWire.send(channel, ZKOp.sync, ZKWire.pathBody(path))
        let got = ZKWire.send(channel, ZKOp.getData, ZKWire.pathBody(path, watch: false))
        let sync = try await synced.get()
        guard sync.err == ZKErr.ok else { throw ZKErr.error(sync.err, "sync", path) }
        let reply = try await got.get()
        switch reply.err {
        case ZKErr.ok:
            // GetDataResponse: data (length, bytes; -1 for none), Stat.
            var body = reply.body
            guard let length = body.readInteger(as: Int32.self), length <= 0 || body.readSlice(length: Int(length)) != nil
            else { throw ComparedError("ZooKeeper sent a short getData reply") }
            let version = try body.statVersion()
            return Int64(version) + 1
        case ZKErr.noNode:
            return 0
        default:
            throw ZKErr.error(reply.err, "getData", path)
        }
    }

    func compareAndSet(_ key: String, version: Int64, _ value: [UInt8]) async throws -> Int64? {
        let path = Self.path(key)
        if version <= 0 {
            // Expected absent: create fails with NodeExists otherwise.
            let created = try await call(ZKOp.create, ZKWire.createBody(path, value))
            switch created.err {
            case ZKErr.ok: return 1
            case ZKErr.nodeExists: return nil
            default: throw ZKErr.error(created.err, "create", path)
            }
        }
        guard version - 1 <= Int64(Int32.max) else { return nil }
        let set = try await call(ZKOp.setData, ZKWire.setDataBody(path, value, version: Int32(version - 1)))
        switch set.err {
        case ZKErr.ok:
            let newVersion = try set.body.statVersion()
            return Int64(newVersion) + 1
        case ZKErr.badVersion, ZKErr.noNode: return nil
        default: throw ZKErr.error(set.err, "setData", path)
        }
    }

    func watch(_ key: String, changed: @escaping @Sendable () -> Void) async throws {
        let path = Self.path(key)
        watches.add(path, changed)
        do {
            try await ZKWire.arm(path, on: channel).get()
        } catch {
            watches.remove(path)
            throw error
        }
    }

    func close() async {
        pings.cancel()
        // Ends the session now rather than when its timeout runs out on the members.
        _ = try? await ZKWire.send(channel, ZKOp.closeSession, ByteBuffer(), timeout: .seconds(2)).get()
        try? await channel.close().get()
    }
}

/// A four-letter word (`srvr`, `mntr`) on a member's client port: the member answers in text and closes.
private enum ZKFourLetterWord {
    static func ask(_ word: String, port: Int) async throws -> String {
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        let answer = loop.makePromise(of: String.self)
        let channel: any Channel
        do {
            channel = try await ClientBootstrap(group: loop)
                .connectTimeout(.seconds(2))
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(ZKWordHandler(word: word, answer: answer))
                    }
                }
                .connect(host: "127.0.0.1", port: port).get()
        } catch {
            answer.fail(error)
            throw error
        }
        let timer = loop.scheduleTask(in: .seconds(2)) {
            answer.fail(ComparedError("ZooKeeper on port \(port): no answer to \(word) within 2 s"))
            channel.close(promise: nil)
        }
        defer { timer.cancel() }
        return try await answer.futureResult.get()
    }
}

private final class ZKWordHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let word: String
    private let answer: EventLoopPromise<String>
    private var text = ""

    init(word: String, answer: EventLoopPromise<String>) {
        self.word = word
        self.answer = answer
    }

    func channelActive(context: ChannelHandlerContext) {
        context.writeAndFlush(Self.wrapOutboundOut(context.channel.allocator.buffer(string: word)), promise: nil)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = Self.unwrapInboundIn(data)
        text += buffer.readString(length: buffer.readableBytes) ?? ""
    }

    func channelInactive(context: ChannelHandlerContext) {
        answer.succeed(text)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        answer.fail(error)
        context.close(promise: nil)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        answer.fail(ComparedError("ZooKeeper closed before answering \(word)"))
    }
}
