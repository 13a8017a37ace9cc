import CircuitAPI
import CircuitRaft
import CircuitStateMachine
import CircuitTransport
import Foundation
import Hummingbird
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// What the API handlers need of the node.
final class NodeContext: Sendable {
    let folder: DataFolder
    let clusterID: UInt64
    let config: NodeConfig
    let service: ControlService
    let logger: Logger

    init(folder: DataFolder, clusterID: UInt64, config: NodeConfig, service: ControlService, logger: Logger) {
        self.folder = folder
        self.clusterID = clusterID
        self.config = config
        self.service = service
        self.logger = logger
    }

    func status() -> StatusView {
        let s = service.driver.status
        return StatusView(
            host: folder.hostID, cluster: HostID.hex(clusterID), role: "\(s.role)", term: s.term,
            leader: s.leader == .none ? nil : HostID.string(s.leader), commitIndex: s.commitIndex,
            appliedIndex: s.appliedIndex, revision: service.state.read { $0.revision },
            voters: s.membership.voters.sorted().map(HostID.string), learners: s.membership.learners.sorted().map(HostID.string))
    }

    /// Sends `request` on to the API at `address` and relays its answer.
    func forward(_ request: Request, to address: String) async throws -> Response {
        var request = request
        let body = try await request.collectBody(upTo: HTTPAPI.maxBody)
        let query = request.uri.query.map { "?" + $0 } ?? ""
        guard let url = URL(string: "http://\(address)\(request.uri.path)\(query)") else {
            throw APIError(status: 500, code: "internal", message: "bad leader address \(address)")
        }
        var forwarded = URLRequest(url: url, timeoutInterval: 10)
        forwarded.httpMethod = request.method.rawValue
        forwarded.setValue("1", forHTTPHeaderField: HTTPAPI.forwardedHeader.rawName)
        if body.readableBytes > 0 { forwarded.httpBody = Data(buffer: body) }
        let (data, response): (Data, URLResponse)
        do {
            (data, response) = try await URLSession.shared.data(for: forwarded)
        } catch {
            throw APIError(status: 503, code: "leader_unreachable", message: "could not reach the leader at \(address): \(error.localizedDescription)")
        }
        let http = response as? HTTPURLResponse
        var headers = HTTPFields()
        headers[.contentType] = http?.value(forHTTPHeaderField: "Content-Type") ?? "application/json"
        return Response(
            status: .init(code: http?.statusCode ?? 502), headers: headers,
            body: .init(byteBuffer: ByteBuffer(bytes: data)))
    }
}

/// The `circuit` daemon: Raft over TCP, the replicated control state, the HTTP/JSON API, and the host's own
/// membership (it registers itself and keeps its session alive).
public final class CircuitDaemon: Sendable {
    public let config: NodeConfig
    private let logger: Logger

    public init(config: NodeConfig, logger: Logger) {
        self.config = config
        self.logger = logger
    }

    /// Runs until SIGTERM or SIGINT, then hands leadership over and stops.
    public func run() async throws {
        try config.validate()
        let folder = try DataFolder(path: config.data)
        let lock = try folder.lock()
        defer { withExtendedLifetime(lock) {} }
        var logger = logger
        logger[metadataKey: "host"] = "\(folder.hostID)"

        // The cluster: from the folder, or formed now from the bootstrap voters.
        let peersFile = "\(folder.path)/peers"
        let bootstrap = try config.bootstrapVoters()
        let clusterID: UInt64
        var peerList: [(host: String, address: String)]
        if let stored = try folder.clusterID() {
            clusterID = stored
            let text = (try? String(contentsOfFile: peersFile, encoding: .utf8)) ?? ""
            peerList = text.split(separator: "\n").compactMap { line in
                let parts = line.split(separator: "@", maxSplits: 1).map(String.init)
                return parts.count == 2 ? (parts[0], parts[1]) : nil
            }
        } else {
            guard !bootstrap.isEmpty else { throw DataFolderError.noCluster(path: folder.path) }
            guard bootstrap.contains(where: { $0.host == folder.hostID }) else {
                throw NodeConfigError.invalid("this host (\(folder.hostID)) is not among the bootstrap voters")
            }
            // Every bootstrapping voter derives the same cluster id from the same voter list.
            var h: UInt64 = 0xcbf2_9ce4_8422_2325
            for b in bootstrap.map(\.host).sorted().joined(separator: ",").utf8 {
                h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01b3
            }
            clusterID = h
            peerList = bootstrap
            try DataFolder.writeDurably(bootstrap.map { "\($0.host)@\($0.address)" }.joined(separator: "\n") + "\n", to: peersFile)
            try folder.setClusterID(clusterID)
            logger.info("formed a new cluster", metadata: ["cluster": "\(HostID.hex(clusterID))", "voters": "\(bootstrap.map(\.host))"])
        }
        logger[metadataKey: "cluster"] = "\(HostID.hex(clusterID))"

        let listen = try NodeConfig.address(config.peerListen, "peer-listen")
        let transport = TCPTransport(
            configuration: .init(clusterID: clusterID, hostID: folder.nodeID, listenHost: listen.host, listenPort: listen.port),
            group: MultiThreadedEventLoopGroup.singleton, logger: logger)
        var peers: [NodeID: (host: String, port: Int)] = [:]
        for p in peerList where p.host != folder.hostID {
            peers[HostID.nodeID(p.host)] = try NodeConfig.address(p.address, "peer \(p.host)")
        }
        transport.setPeers(peers)

        var options = RaftDriver.Options()
        options.tickInterval = .milliseconds(config.tickMillis)
        let state = ReplicatedControlState()
        let driver = try RaftDriver(
            config: RaftConfig(id: folder.nodeID, voters: peerList.map { HostID.nodeID($0.host) }),
            store: try SQLiteLogStore(path: folder.logPath, logger: logger), stateMachine: state, transport: transport,
            snapshots: try SnapshotFiles(directory: folder.snapshotPath, logger: logger), options: options, logger: logger)
        transport.deliver(to: driver)
        try await transport.start()
        driver.start()
        let service = ControlService(driver: driver, state: state, logger: logger)
        let node = NodeContext(folder: folder, clusterID: clusterID, config: config, service: service, logger: logger)

        let client = try NodeConfig.address(config.clientListen, "client-listen")
        let appLogger = logger
        let app = Application(
            router: HTTPAPI(node: node).router(),
            configuration: .init(address: .hostname(client.host, port: client.port), serverName: "circuit"),
            onServerRunning: { _ in appLogger.info("API listening", metadata: ["address": "\(client.host):\(client.port)"]) },
            logger: logger)
        let agent = HostAgent(node: node, role: .voter)
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: app), .init(service: agent)], gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger))
        do {
            try await group.run()
        } catch {
            logger.error("stopping after an error", metadata: ["error": "\(error)"])
        }
        logger.info("shutting down: handing leadership over if leader")
        await driver.shutdown()
        await transport.stop()
        logger.info("stopped")
    }
}

/// The host's own part in the membership: it registers itself (through its own API, which forwards to the leader)
/// and keeps its session alive; while this node leads, it also expires the sessions of hosts and clients that went
/// silent.
struct HostAgent: Service {
    let node: NodeContext
    let role: HostRole

    func run() async throws {
        // Ends quietly at graceful shutdown: the loop's sleep is cancelled.
        try? await cancelWhenGracefulShutdown { try await loop() }
    }

    private func loop() async throws {
        var session: SessionID?
        var lastKeepAlive = ContinuousClock.now
        let ttl = node.config.sessionTTLMillis
        while !Task.isCancelled {
            await node.service.expireLeases()
            let registered = node.service.state.read { state -> Bool in
                guard let session, let host = state.hosts[node.folder.hostID] else { return false }
                return host.state == .alive && host.session == session
            }
            if !registered, node.service.driver.status.leader != .none {
                session = await register(ttl: ttl)
                lastKeepAlive = .now
            } else if let s = session, ContinuousClock.now - lastKeepAlive > .milliseconds(Int64(ttl / 3)) {
                if await !keepAlive(s) { session = nil }
                lastKeepAlive = .now
            }
            try await Task.sleep(for: .milliseconds(100))
        }
    }

    private func call(_ method: String, _ path: String, body: Data? = nil) async -> (Int, Data)? {
        guard let url = URL(string: "http://\(node.config.advertisedClient)\(path)") else { return nil }
        var request = URLRequest(url: url, timeoutInterval: 5)
        request.httpMethod = method
        request.httpBody = body
        guard let (data, response) = try? await URLSession.shared.data(for: request) else { return nil }
        return ((response as? HTTPURLResponse)?.statusCode ?? 0, data)
    }

    private func register(ttl: UInt64) async -> SessionID? {
        let me = HostView(
            id: node.folder.hostID, peerAddress: node.config.advertisedPeer, clientAddress: node.config.advertisedClient,
            role: "\(role)", state: "alive", session: 0, joinedAt: 0)
        guard let body = try? JSONEncoder().encode(me),
            let (status, data) = await call("POST", "/v1/hosts/register?ttl_ms=\(ttl)", body: body), status == 200,
            let view = try? JSONDecoder().decode(WriteView.self, from: data)
        else { return nil }
        node.logger.info("registered", metadata: ["session": "\(view.session)", "revision": "\(view.revision)"])
        return view.session
    }

    private func keepAlive(_ session: SessionID) async -> Bool {
        guard let (status, _) = await call("POST", "/v1/sessions/\(session)/keepalive") else { return true }
        return status != 404
    }
}
