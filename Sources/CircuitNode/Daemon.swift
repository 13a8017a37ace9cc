import CircuitAPI
import CircuitFS
import CircuitRaft
import CircuitSecurity
import CircuitStateMachine
import CircuitTransport
import Foundation
import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization
import CircuitClient

import NIOHTTP1

/// What the API handlers need of the node.
final class NodeContext: Sendable {
    let folder: DataFolder
    let clusterID: UInt64
    let config: NodeConfig
    let service: ControlService
    let transport: TCPTransport
    let logger: Logger
    /// Peer addresses known from the data folder (the bootstrap list, or what the cluster said at the join).
    let addressBook: [String: String]
    /// Rung when a job or a job's process changed: the leader's job keeper looks at once.
    let jobsChanged = Bell()
    /// The cluster's CA with its key, on a member started with `tls-ca-key`: it creates join tokens and issues the
    /// certificates of the hosts that join with one (`JoinRoutes`).
    let authority: CertificateAuthority?
    private let dialing = Mutex<[NodeID: String]>([:])

    init(
        folder: DataFolder, clusterID: UInt64, config: NodeConfig, service: ControlService, transport: TCPTransport,
        addressBook: [String: String], authority: CertificateAuthority? = nil, logger: Logger
    ) {
        self.folder = folder
        self.clusterID = clusterID
        self.config = config
        self.service = service
        self.transport = transport
        self.addressBook = addressBook
        self.authority = authority
        self.logger = logger
    }

    /// Points the transport at every Raft member but this one, at the address the membership registry gives (or
    /// the address book, for members not registered yet).
    func syncPeers() {
        let raft = service.driver.status
        var members = Set(raft.membership.members)
        if raft.leader != .none { members.insert(raft.leader) }
        // A host that joined knows nothing of the membership until the log reaches it, but must answer the leader:
        // until then it dials everyone the cluster named at the join.
        if !members.contains(folder.nodeID) { members.formUnion(addressBook.keys.map(HostID.nodeID)) }
        let registered = service.state.read { state in state.hosts.mapValues(\.peerAddress) }
        var want: [NodeID: String] = [:]
        for id in members where id != folder.nodeID {
            let host = HostID.string(id)
            if let address = registered[host] ?? addressBook[host] { want[id] = address }
        }
        let changed = dialing.withLock { current in
            defer { current = want }
            return current != want
        }
        guard changed else { return }
        var peers: [NodeID: (host: String, port: Int)] = [:]
        for (id, address) in want {
            if let a = try? NodeConfig.address(address, "peer") { peers[id] = a }
        }
        transport.setPeers(peers)
        logger.info("peers", metadata: ["peers": "\(want.keys.sorted().map(HostID.string))"])
    }

    /// Peer addresses of every Raft member this node knows, itself included, registered or not: what a joining
    /// host needs to dial back (the voters may not have registered yet when it joins).
    func memberPeerAddresses() -> [String: String] {
        var out = dialing.withLock { $0.reduce(into: [String: String]()) { $0[HostID.string($1.key)] = $1.value } }
        out[folder.hostID] = config.advertisedPeer
        return out
    }

    func status() -> StatusView {
        let s = service.driver.status
        return StatusView(
            host: folder.hostID, cluster: HostID.hex(clusterID), role: "\(s.role)", term: s.term,
            leader: s.leader == .none ? nil : HostID.string(s.leader), commitIndex: s.commitIndex,
            appliedIndex: s.appliedIndex, revision: service.state.read { $0.revision },
            voters: s.membership.voters.sorted().map(HostID.string), learners: s.membership.learners.sorted().map(HostID.string),
            watches: service.state.watcherCount, security: config.security)
    }

    /// Sends `request` on to the API at `address` and relays its answer. The request stays `caller`'s there: its
    /// limits and the owner of a session it asks for are the client's, not this member's.
    func forward(_ request: Request, for caller: Caller, to address: String) async throws -> Response {
        var request = request
        let body = try await request.collectBody(upTo: HTTPAPI.maxBody)
        let uri = request.uri.path + (request.uri.query.map { "?" + $0 } ?? "")
        let headers = [(HTTPAPI.forwardedHeader.rawName, "1")] + caller.relayHeaders
        let answer: HTTPExchange.Answer
        do {
            answer = try await HTTPPool.shared(address).perform(
                NIOHTTP1.HTTPMethod(rawValue: request.method.rawValue), uri,
                body: body.readableBytes > 0 ? Array(buffer: body) : nil, headers: headers)
        } catch let error as HTTPExchangeError where error.requestNotSent {
            throw APIError(status: 503, code: "leader_unreachable", message: "could not reach the leader at \(address): \(error)")
        } catch {
            // Sent, and no answer came back: the leader may have applied it.
            throw APIError(
                status: 503, code: "outcome_unknown",
                message: "the leader at \(address) did not answer the forwarded request, which may or may not have been applied: \(error)")
        }
        return Response(relaying: answer)
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
        try self.config.validate()
        let folder = try DataFolder(path: self.config.data)
        let lock = try folder.lock()
        defer { withExtendedLifetime(lock) {} }
        var logger = self.logger
        logger[metadataKey: "host"] = "\(folder.hostID)"
        // A new host with a join token gets its certificate from the cluster first; with tls-dir, the TLS files are
        // then (and at every later start) the ones in that folder.
        let config = try await Self.tlsFromDirectory(self.config, folder: folder, logger: logger)
        let tls = try Self.loadTLS(config, hostID: folder.hostID, logger: logger)
        let authority = try Self.loadAuthority(config, logger: logger)

        // The cluster: from the folder, or formed now from the bootstrap voters, or joined through a member.
        let peersFile = "\(folder.path)/peers"
        let votersFile = "\(folder.path)/bootstrap-voters"
        let bootstrap = try config.bootstrapVoters()
        let clusterID: UInt64
        if let stored = try folder.clusterID() {
            clusterID = stored
        } else if let contact = config.join {
            clusterID = try await join(through: contact, folder: folder, peersFile: peersFile, logger: logger)
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
            let lines = bootstrap.map { "\($0.host)@\($0.address)" }.joined(separator: "\n") + "\n"
            try DataFolder.writeDurably(lines, to: peersFile)
            try DataFolder.writeDurably(lines, to: votersFile)
            try folder.setClusterID(clusterID)
            logger.info("formed a new cluster", metadata: ["cluster": "\(HostID.hex(clusterID))", "voters": "\(bootstrap.map(\.host))"])
        }
        logger[metadataKey: "cluster"] = "\(HostID.hex(clusterID))"
        if folder.isWorker() {
            try await WorkerNode(folder: folder, clusterID: clusterID, config: config, tls: tls, logger: logger).run()
            return
        }
        let addressBook = Self.readPeers(peersFile)
        // A bootstrapped voter starts from the bootstrap voters; a joined host from nothing (it learns the
        // membership from the log or a snapshot). After that the membership is the log's.
        let initialVoters = Self.readPeers(votersFile).keys.map(HostID.nodeID).sorted()

        let listen = try NodeConfig.address(config.peerListen, "peer-listen")
        var transportConfiguration = TCPTransport.Configuration(
            clusterID: clusterID, hostID: folder.nodeID, listenHost: listen.host, listenPort: listen.port)
        transportConfiguration.tls = tls
        // Raft and the peers' connections share one event loop of their own: a message read from a peer is stepped,
        // and what it makes ready written, on that thread, with no hand-off between threads on the commit path.
        let raftLoop = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let transport = TCPTransport(configuration: transportConfiguration, group: raftLoop, logger: logger)

        var options = RaftDriver.Options()
        options.tickInterval = .milliseconds(config.tickMillis)
        options.executor = EventLoopRaftExecutor(raftLoop.next())
        options.snapshotEntries = config.snapshotEntries
        let state = ReplicatedControlState(historyLimit: Self.watchHistory)
        var raftConfig = RaftConfig(id: folder.nodeID, voters: initialVoters)
        raftConfig.randomSeed = UInt64.random(in: 1...UInt64.max)  // fresh at each start (see RaftConfig.randomSeed)
        raftConfig.asyncStorageWrites = config.asyncStorageWrites
        let driver = try RaftDriver(
            config: raftConfig,
            store: try SQLiteLogStore(path: folder.logPath, logger: logger), stateMachine: state, transport: transport,
            snapshots: try SnapshotFiles(directory: folder.snapshotPath, logger: logger), options: options, logger: logger)
        transport.deliver(to: driver)
        try await transport.start()
        driver.start()
        let service = ControlService(driver: driver, state: state, logger: logger)
        let node = NodeContext(
            folder: folder, clusterID: clusterID, config: config, service: service, transport: transport,
            addressBook: addressBook, authority: authority, logger: logger)
        node.syncPeers()

        let ownerAddress: @Sendable (String) async throws -> String? = { host in
            node.service.state.read { $0.hosts[host].flatMap { $0.state == .alive ? $0.clientAddress : nil } }
        }
        let runtime = HostRuntime(config: config, hostID: folder.hostID, logger: logger, ownerAddress: ownerAddress)
        let router = HTTPAPI(node: node, runner: runtime.procs).router()
        router.add(middleware: ChannelRoutes(hostID: folder.hostID, channels: runtime.channels, ownerAddress: ownerAddress))
        router.add(middleware: StdioRoutes(runtime: runtime, ownerAddress: ownerAddress))
        router.add(middleware: SelectRoutes(runtime: runtime, ownerAddress: ownerAddress))
        try await Self.serve(
            router,
            beside: [HostAgent(node: node), JobAgent(node: node), HostRuntimeService(runtime: runtime), WatchCloser(state: node.service.state, logger: logger)],
            config: config,
            tls: tls,
            records: WireRecords(service: service),
            logger: logger)
        logger.info("shutting down: handing leadership over if leader")
        await driver.shutdown()
        await transport.stop()
        try? await raftLoop.shutdownGracefully()
        logger.info("stopped")
    }
}

extension CircuitDaemon {
    /// Serves the API (`router`, at the client listen address) beside the host's `agents` until SIGTERM or SIGINT
    /// (swift-service-lifecycle); returns once both have stopped.
    static func serve(
        _ router: Router<APIContext>, beside agents: [any Service], config: NodeConfig, tls: TLSFiles?, records: WireRecords? = nil,
        logger: Logger
    ) async throws {
        // A write to the pipe of a process that has gone fails with EPIPE instead of killing the daemon.
        signal(SIGPIPE, SIG_IGN)
        let client = try NodeConfig.address(config.clientListen, "client-listen")
        let app = Application(
            router: router,
            server: tls.map { HTTPServerBuilder.clusterTLS($0, records: records, logger: logger) } ?? .plain(records: records, logger: logger),
            configuration: .init(address: .hostname(client.host, port: client.port), serverName: "circuit"),
            onServerRunning: { _ in logger.info("API listening", metadata: ["address": "\(client.host):\(client.port)"]) },
            logger: logger)
        var configuration = ServiceGroupConfiguration(
            services: [.init(service: app)] + agents.map { .init(service: $0) }
                + [.init(service: TLSReloader(tls: tls, logger: logger)), .init(service: StopWatchdog(logger: logger))]
                // A mount that fails or is unmounted from outside is logged; the daemon goes on.
                + (try mountService(config, tls: tls, logger: logger)).map {
                    .init(service: $0, successTerminationBehavior: .ignore, failureTerminationBehavior: .ignore)
                },
            gracefulShutdownSignals: [.sigterm, .sigint],
            logger: logger)
        // The server waits for requests in flight; a long poll (a receive on an empty channel, a wait on a process
        // that runs on) could hold a graceful stop for ever: after this, they are cancelled.
        configuration.maximumGracefulShutdownDuration = gracefulStopLimit
        // A service that does not end once cancelled: ServiceLifecycle's own bound would crash the daemon (a fatal
        // error, a backtrace, a process a test's waitUntilExit never saw end); `StopWatchdog` bounds the whole stop
        // instead, with an exit.
        configuration.maximumCancellationDuration = nil
        let group = ServiceGroup(configuration: configuration)
        do {
            try await group.run()
        } catch {
            logger.error("stopping after an error", metadata: ["error": "\(error)"])
        }
    }

    /// The API's router, with the role check and the per-client limits in front of every route.
    static func router(tls: TLSFiles?, config: NodeConfig, logger: Logger) -> Router<APIContext> {
        let router = Router(context: APIContext.self)
        router.add(middleware: Authorization(tls: tls, logger: logger))
        router.add(
            middleware: ClientLimits(
                limits: .init(streams: config.maxStreamsPerClient, watches: config.maxWatchesPerClient), logger: logger))
        return router
    }

    /// Loads the TLS identity the config names, checks that it is this host's (its name is the host id, it
    /// carries the `host` role), and makes it the identity of every connection this process dials.
    static func loadTLS(_ config: NodeConfig, hostID: String, logger: Logger) throws -> TLSFiles? {
        guard let ca = config.tlsCA, let certificate = config.tlsCert, let key = config.tlsKey else {
            if config.insecure && config.security.hasPrefix("INSECURE") {
                logger.warning("INSECURE: plaintext beyond loopback (--insecure): whoever reaches the ports can run processes on this host")
            }
            return nil
        }
        let tls = try TLSFiles(ca: ca, certificate: certificate, key: key)
        let grant = tls.grant
        guard grant.roles.contains(.host), grant.name == hostID else {
            throw NodeConfigError.invalid(
                "the certificate \(certificate) is \(grant), not this host's (\(hostID) with the host role): "
                    + "issue one with `circuit ca issue --host \(hostID)`")
        }
        ClientTLS.default = tls
        logger.info("mutual TLS on the peer port and the API", metadata: ["certificate": "\(grant)"])
        return tls
    }

    /// The CA with its key, if the config names the key (`tls-ca-key`): checked to be the key of `tls-ca`'s
    /// certificate.
    static func loadAuthority(_ config: NodeConfig, logger: Logger) throws -> CertificateAuthority? {
        guard let keyPath = config.tlsCAKey else { return nil }
        guard let caPath = config.tlsCA else {
            throw NodeConfigError.invalid("tls-ca-key needs TLS: give tls-ca, tls-cert and tls-key, or tls-dir")
        }
        let authority = try CertificateAuthority.load(certificate: caPath, key: keyPath)
        logger.info(
            "holding the CA key: this member creates join tokens and issues certificates to hosts joining with one",
            metadata: ["key": "\(keyPath)"])
        return authority
    }

    /// With tls-dir (and not the three files named one by one): the config with the files of that folder. If they are
    /// not there yet, the folder belongs to no cluster, and a join token is given, they are first fetched from the
    /// cluster (`TokenJoin`).
    static func tlsFromDirectory(_ config: NodeConfig, folder: DataFolder, logger: Logger) async throws -> NodeConfig {
        guard config.tlsCA == nil, let directory = config.tlsDir, let files = config.tlsFiles(hostID: folder.hostID) else { return config }
        let present = [files.ca, files.certificate, files.key].allSatisfy { FileManager.default.fileExists(atPath: $0) }
        if !present {
            guard try folder.clusterID() == nil, let token = config.joinToken, let contact = config.join else {
                throw NodeConfigError.invalid(
                    "tls-dir \(directory) holds no \(folder.hostID).pem and \(folder.hostID).key (and ca.pem): a new host gets "
                        + "them by joining with a token (`circuit token create`, then `circuit join ADDRESS --token T --tls-dir DIR`); "
                        + "a host that did so finds them in the folder it gave then")
            }
            try await TokenJoin(contact: contact, token: token, directory: directory, hostID: folder.hostID, logger: logger)
                .run()
        }
        var config = config
        config.tlsCA = files.ca
        config.tlsCert = files.certificate
        config.tlsKey = files.key
        return config
    }

    /// How long a graceful stop waits for requests in flight before it cancels them.
    static let gracefulStopLimit: Duration = .seconds(5)

    /// The changes a new cluster keeps for watches that start from a past revision (`?from=`); a watch from before
    /// the oldest kept is refused with the revision to start from (etcd's "compacted"). About 120 bytes each in
    /// memory. Part of the replicated state (every snapshot carries it, so every replica keeps the same), hence a
    /// constant and not a node's setting.
    static let watchHistory = 20_000

    /// The file system mounted at the config's `mount`, answering through this daemon's own API with the client
    /// identity the config names (`mount-tls-cert`, `mount-tls-key`; by default the host's own, `tls`).
    static func mountService(_ config: NodeConfig, tls: TLSFiles?, logger: Logger) throws -> [any Service] {
        guard let mountpoint = config.mount else { return [] }
        var identity = tls
        if let tls, let certificate = config.mountTLSCert, let key = config.mountTLSKey {
            identity = try TLSFiles(ca: tls.caPath, certificate: certificate, key: key)
            logger.info("the mount acts as \(identity!.grant)", metadata: ["mountpoint": "\(mountpoint)"])
        }
        return [
            MountService(
                mountpoint: mountpoint, node: config.advertisedClient, tls: identity, allowOther: config.mountAllowOther,
                logger: logger)
        ]
    }

    /// `id@address` lines.
    static func readPeers(_ file: String) -> [String: String] {
        let text = (try? String(contentsOfFile: file, encoding: .utf8)) ?? ""
        var out: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: "@", maxSplits: 1).map(String.init)
            if parts.count == 2 { out[parts[0]] = parts[1] }
        }
        return out
    }

    /// Joins the cluster that `contact` (any member's API) belongs to, as a learner: the leader registers this host
    /// and adds it to Raft's membership; the log (or a snapshot) follows once this node runs.
    func join(through contact: String, folder: DataFolder, peersFile: String, logger: Logger) async throws -> UInt64 {
        let client = CircuitClient(endpoints: [contact])
        // The contact may not know a leader yet (an election, or it is new itself): retry for a while.
        let deadline = ContinuousClock.now + .seconds(30)
        func retrying<T>(_ what: String, _ call: () async throws(CircuitClientError) -> T) async throws -> T {
            while true {
                do {
                    return try await call()
                } catch {
                    let transient: Bool
                    switch error {
                    case .unreachable, .noAnswer: transient = true
                    case .api(let e): transient = e.statusCode == 503
                    case .badAnswer: transient = false
                    }
                    guard transient, ContinuousClock.now < deadline else { throw error }
                    logger.info("join: retrying", metadata: ["step": "\(what)", "error": "\(error)"])
                    try await Task.sleep(for: .milliseconds(200))
                }
            }
        }
        let status = try await retrying("status") { () async throws(CircuitClientError) in try await client.status() }
        guard let clusterID = UInt64(status.cluster, radix: 16) else {
            throw NodeConfigError.invalid("\(contact) answered with cluster id \(status.cluster)")
        }
        let me = HostView(
            id: folder.hostID, peerAddress: config.advertisedPeer, clientAddress: config.advertisedClient,
            role: config.joinAs, state: "alive", session: 0, joinedAt: 0)
        let ttl = config.sessionTTLMillis
        let hosts = try await retrying("join") { () async throws(CircuitClientError) in try await client.join(me, ttlMillis: ttl) }
        if config.joinAs == "worker" {
            try WorkerNode.writeContacts(WorkerNode.contacts(in: hosts, fallback: contact), folder: folder)
            try folder.setWorker()
        } else {
            // Raft's members only: workers have no peer port worth dialing.
            let lines = hosts.filter { $0.role == "voter" || $0.role == "learner" }.map { "\($0.id)@\($0.peerAddress)" }
                .joined(separator: "\n") + "\n"
            try DataFolder.writeDurably(lines, to: peersFile)
        }
        try folder.setClusterID(clusterID)
        logger.info(
            "joined the cluster", metadata: ["as": "\(config.joinAs)", "cluster": "\(status.cluster)", "through": "\(contact)"])
        return clusterID
    }
}

/// Bounds a graceful stop: from SIGTERM, the API and the agents have `gracefulStopLimit` to finish what is in flight,
/// then they are cancelled, then the leader hands over and the transport closes. If the process is still here
/// `limit` after the signal, something did not end when cancelled: it says so and exits, as a kill -9 would end it
/// (everything acknowledged is durable already).
struct StopWatchdog: Service {
    let logger: Logger
    static let limit: Duration = CircuitDaemon.gracefulStopLimit + .seconds(7)

    func run() async throws {
        try? await gracefulShutdown()
        let logger = self.logger
        let thread = Thread {
            Thread.sleep(forTimeInterval: Double(Self.limit.components.seconds))
            logger.error("the daemon did not stop within \(Self.limit) of the signal (something did not end when cancelled): exiting now")
            _exit(1)
        }
        thread.name = "stop-watchdog"
        thread.start()
    }
}

/// At a graceful stop, ends the watches this node serves, which never end on their own and would hold up the API
/// server's stop. The service group stops its services in the reverse of their order, so this one, listed after the
/// server, is stopped before it.
struct WatchCloser: Service {
    let state: ReplicatedControlState
    let logger: Logger

    func run() async throws {
        try? await gracefulShutdown()
        logger.info("stopping gracefully: requests in flight have 5 s", metadata: ["watches_ended": "\(state.watcherCount)"])
        state.endWatches()
    }
}

/// The host's own part in the membership: it registers itself (through its own API, which forwards to the leader)
/// and keeps its session alive; while this node leads, it also expires the sessions of hosts and clients that went
/// silent, and replaces voters lost for long. The expiries have a loop of their own: a keep-alive or a membership
/// change that is slow to answer (a membership change waits for a commit, a keep-alive up to a fifth of the TTL)
/// never holds back another host's expiry.
struct HostAgent: Service {
    let node: NodeContext
    /// Failures of a registration or keep-alive: a new one is logged at once, the same one again after 10 s (the loop
    /// retries every 100 ms).
    private let problems = RepeatedProblems(every: .seconds(10))

    func run() async throws {
        // Ends quietly at graceful shutdown: the loops' sleeps are cancelled.
        try? await cancelWhenGracefulShutdown {
            try await withThrowingDiscardingTaskGroup { group in
                group.addTask { try await expiries() }
                group.addTask { try await loop() }
            }
        }
    }

    /// Every 100 ms: while leader, proposes the end of each session whose lease ran out.
    private func expiries() async throws {
        while !Task.isCancelled {
            await node.service.expireLeases()
            try await Task.sleep(for: .milliseconds(100))
        }
    }

    private func loop() async throws {
        var session: SessionID?
        let ttl = node.config.sessionTTLMillis
        var schedule = KeepAliveSchedule(ttlMillis: ttl, now: .now)
        var keeper = VoterKeeper(lostAfter: node.config.voterReplaceAfterMillis)
        while !Task.isCancelled {
            node.syncPeers()
            if node.service.driver.status.role == .leader {
                await keepVoters(&keeper)
            } else {
                keeper = VoterKeeper(lostAfter: keeper.lostAfter)
            }
            let registered = node.service.state.read { state -> Bool in
                guard let session, let host = state.hosts[node.folder.hostID] else { return false }
                return host.state == .alive && host.session == session
            }
            let raft = node.service.driver.status
            // A host removed from Raft's membership (or not yet in it) does not register itself.
            if !registered, raft.leader != .none, raft.membership.members.contains(node.folder.nodeID) {
                let sent = ContinuousClock.now
                session = await register(ttl: ttl)
                if session != nil { schedule.answered(sentAt: sent, at: .now) }
            } else if let s = session, schedule.isDue(now: .now) {
                let sent = ContinuousClock.now
                let outcome = await keepAlive(s, timeout: schedule.callTimeout)
                if outcome == .gone { session = nil }
                schedule.record(outcome, sentAt: sent, at: .now)?.log(to: node.logger, session: s)
            }
            try await Task.sleep(for: .milliseconds(100))
        }
    }

    /// While leader: replaces a voter lost for long by a live learner (see `VoterKeeper`).
    private func keepVoters(_ keeper: inout VoterKeeper) async {
        let membership = node.service.driver.status.membership
        let alive = node.service.state.read { state in Set(state.hosts.values.filter { $0.state == .alive }.map(\.id)) }
        let action = keeper.decide(
            now: ControlService.monotonicMilliseconds(), voters: Set(membership.voters.map(HostID.string)),
            learners: Set(membership.learners.map(HostID.string)), alive: alive)
        switch action {
        case nil:
            return
        case .remove(let lost)?:
            do {
                try await node.service.driver.changeMembership(.remove(HostID.nodeID(lost)))
                node.logger.warning("removed a voter lost for long", metadata: ["voter": "\(lost)"])
            } catch {
                node.logger.info("could not remove a lost voter yet", metadata: ["voter": "\(lost)", "error": "\(error)"])
            }
        case .promote(let candidates, let lost)?:
            for learner in candidates {
                do {
                    try await node.service.driver.changeMembership(.promote(HostID.nodeID(learner)))
                } catch {
                    node.logger.info("could not promote a learner yet", metadata: ["learner": "\(learner)", "error": "\(error)"])
                    continue
                }
                // The registry follows Raft: retried for up to a second (a failure is logged by the next look).
                for _ in 0..<10 {
                    if (try? await node.service.execute(.setHostRole(id: learner, role: .voter))) != nil { break }
                    try? await Task.sleep(for: .milliseconds(100))
                }
                node.logger.warning("promoted a learner to replace a voter lost for long", metadata: ["learner": "\(learner)", "voter": "\(lost)"])
                return
            }
        }
    }

    private func call(_ method: String, _ path: String, body: Data? = nil, timeout: Duration = .seconds(5)) async -> (Int, Data)? {
        let answer: HTTPExchange.Answer
        do {
            answer = try await HTTPExchange.perform(
                NIOHTTP1.HTTPMethod(rawValue: method), path, to: node.config.advertisedClient, body: body.map { Array($0) },
                timeout: timeout)
        } catch {
            problem("\(method) \(path): no answer from this host's API: \(error)")
            return nil
        }
        if answer.status != 200 {
            problem("\(method) \(path): HTTP \(answer.status) \(String(decoding: answer.body.prefix(300), as: UTF8.self))")
        }
        return (answer.status, Data(answer.body))
    }

    /// Logs why the host could not register or keep its session alive (see `problems`).
    private func problem(_ what: String) {
        if problems.isNew(what) { node.logger.info("the host's membership call failed", metadata: ["call": "\(what)"]) }
    }

    private func register(ttl: UInt64) async -> SessionID? {
        let role = node.service.driver.status.membership.isVoter(node.folder.nodeID) ? "voter" : "learner"
        return await registerHost(hostID: node.folder.hostID, role: role, ttl: ttl, config: node.config, logger: node.logger) { uri, body in
            await call("POST", uri, body: Data(body))
        }
    }

    private func keepAlive(_ session: SessionID, timeout: Duration) async -> KeepAliveOutcome {
        KeepAliveOutcome(status: await call("POST", "/v1/sessions/\(session)/keepalive", timeout: timeout)?.0)
    }
}

/// Registers this host (its addresses and `role`) for a session of `ttl` milliseconds, sending the request with
/// `post` (to an API that forwards it to the leader); answers the new session, or nil if it was not granted.
func registerHost(
    hostID: String, role: String, ttl: UInt64, config: NodeConfig, logger: Logger,
    post: (_ uri: String, _ body: [UInt8]) async -> (Int, Data)?
) async -> SessionID? {
    let me = HostView(
        id: hostID, peerAddress: config.advertisedPeer, clientAddress: config.advertisedClient, role: role, state: "alive",
        session: 0, joinedAt: 0)
    guard let body = try? JSONEncoder().encode(me),
        let (status, data) = await post("/v1/hosts/register?ttl_ms=\(ttl)", Array(body)), status == 200,
        let view = try? JSONDecoder().decode(WriteView.self, from: data)
    else { return nil }
    logger.info("registered", metadata: ["role": "\(role)", "session": "\(view.session)", "revision": "\(view.revision)"])
    return view.session
}

/// Which failures to log when a loop retries often: a new one, or the same one again after `every`.
final class RepeatedProblems: Sendable {
    private let every: Duration
    private let last = Mutex<(what: String, at: ContinuousClock.Instant)?>(nil)

    init(every: Duration) { self.every = every }

    /// Whether `what` is to be logged now; if so, it is remembered as logged.
    func isNew(_ what: String) -> Bool {
        let now = ContinuousClock.now
        return last.withLock { last in
            if let seen = last, seen.what == what, now - seen.at < every { return false }
            last = (what, now)
            return true
        }
    }
}
