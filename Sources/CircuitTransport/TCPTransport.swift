import CircuitRaft
import CircuitSecurity
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization

/// Raft's transport over TCP: each node listens on its peer port and dials each peer once; it sends on the
/// connection it dialed and receives on the ones it accepted.
///
/// A dialed connection opens with a `hello` (protocol version, cluster id, this host's id); the accepting side
/// answers `welcome` or `refused` and closes: a peer of another cluster, another protocol version, or claiming to
/// be this host is refused with a log line naming its address. A malformed or oversized frame closes that connection
/// only. Sends never block: while a peer is unreachable or its connection is not writable (back-pressure), Raft
/// messages to it are dropped and counted — Raft retransmits — and the connection is retried with exponential
/// back-off.
///
/// With `tls` set, both ends speak mutual TLS 1.3 first, with certificates of the cluster's CA; the hello is then
/// believed only from a certificate with the `host` role whose name is the host id the hello claims, and the
/// dialing side checks that the certificate of the host it reached names the host it dialed.
public final class TCPTransport: RaftTransport, Sendable {
    public struct Configuration: Sendable {
        public var clusterID: UInt64
        public var hostID: NodeID
        public var listenHost: String
        /// 0 picks a free port (see `localPort`).
        public var listenPort: Int
        /// Frames larger than this are refused. Default 16 MiB.
        public var maxFrameBytes: Int = 16 << 20
        /// Retry delays after a failed connection, doubling from the first to the last. Defaults 20 ms and 1 s.
        public var minBackoff: TimeAmount = .milliseconds(20)
        public var maxBackoff: TimeAmount = .seconds(1)
        /// Mutual TLS with the cluster's CA; nil: plaintext (loopback, or a daemon started `--insecure`).
        public var tls: TLSFiles?

        public init(clusterID: UInt64, hostID: NodeID, listenHost: String = "127.0.0.1", listenPort: Int = 0) {
            self.clusterID = clusterID
            self.hostID = hostID
            self.listenHost = listenHost
            self.listenPort = listenPort
        }
    }

    /// What a peer connection delivers to.
    public typealias Receiver = @Sendable (PeerFrame, NodeID) -> Void
    /// Told when an established connection to a peer closes (the peer may have died).
    public typealias LossHandler = @Sendable (NodeID) -> Void

    public let configuration: Configuration
    private let group: any EventLoopGroup
    private let logger: Logger
    private let state = NIOLockedValueBox(State())
    /// Whether any cut is set: a received frame takes the lock to look only then.
    private let cutting = Atomic<Bool>(false)

    private struct State {
        var peers: [NodeID: (host: String, port: Int)] = [:]
        var connections: [NodeID: Connection] = [:]
        var server: (any Channel)?
        var receiver: Receiver?
        var onLoss: LossHandler?
        var stopped = false
        var dropped = 0
        /// Fault injection (tests only, see `cut`): peers whose frames are dropped on the way out, and on the way in.
        var cutTo: Set<NodeID> = []
        var cutFrom: Set<NodeID> = []
    }

    private enum Connection {
        /// Frames sent meanwhile wait here (bounded) and go out once the handshake succeeds.
        case connecting(queued: [ByteBuffer], bytes: Int, backoff: TimeAmount)
        case ready(any Channel)
        case backingOff(until: NIODeadline, next: TimeAmount)
    }

    /// At most this much waits for a connection being set up; beyond it frames are dropped.
    private static let maxQueuedBytes = 4 << 20

    public init(configuration: Configuration, group: any EventLoopGroup, logger: Logger) {
        self.configuration = configuration
        self.group = group
        var logger = logger
        logger[metadataKey: "host"] = "\(configuration.hostID)"
        self.logger = logger
    }

    /// Where frames from peers go: Raft batches and snapshot chunks (after the handshake).
    public func setReceiver(_ receiver: @escaping Receiver) {
        state.withLockedValue { $0.receiver = receiver }
    }

    /// Who hears that an established connection to a peer closed.
    public func setLossHandler(_ handler: @escaping LossHandler) {
        state.withLockedValue { $0.onLoss = handler }
    }

    /// Fault injection for tests where the network itself cannot be cut (the daemon allows it only when started
    /// with `--test-faults`): from now on, frames to `sendingTo` are dropped before they are written and frames from
    /// `receivingFrom` after they are read, as a partition drops packets. Empty sets heal.
    public func cut(sendingTo: Set<NodeID>, receivingFrom: Set<NodeID>) {
        state.withLockedValue {
            $0.cutTo = sendingTo
            $0.cutFrom = receivingFrom
        }
        cutting.store(!sendingTo.isEmpty || !receivingFrom.isEmpty, ordering: .relaxed)
        logger.warning("fault injection: peer frames cut", metadata: ["to": "\(sendingTo.sorted())", "from": "\(receivingFrom.sorted())"])
    }

    /// Delivers everything to `driver`, and tells it of lost connections.
    public func deliver(to driver: RaftDriver) {
        setReceiver { [weak self] frame, peer in
            if let self, self.cutting.load(ordering: .relaxed), self.state.withLockedValue({ $0.cutFrom.contains(peer) }) { return }
            switch frame {
            case .raft(let messages): driver.receive(messages)
            case .snapshotChunk(let chunk): driver.receive(chunk)
            default: break
            }
        }
        setLossHandler { peer in driver.peerUnreachable(peer) }
    }

    /// The peers' addresses (replaces the previous set; connections to peers no longer listed are closed).
    public func setPeers(_ peers: [NodeID: (host: String, port: Int)]) {
        let gone: [any Channel] = state.withLockedValue { s in
            s.peers = peers
            var gone: [any Channel] = []
            for (id, c) in s.connections where peers[id] == nil {
                if case .ready(let ch) = c { gone.append(ch) }
                s.connections[id] = nil
            }
            return gone
        }
        for ch in gone { ch.close(promise: nil) }
    }

    /// Messages dropped so far because their peer was unreachable or not writable.
    public var droppedMessages: Int { state.withLockedValue { $0.dropped } }

    /// Binds the peer port.
    public func start() async throws {
        let config = configuration
        let logger = logger
        let transport = self
        let server = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls = config.tls {
                        try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls.serverContext()))
                    }
                    try channel.pipeline.syncOperations.addHandler(
                        ByteToMessageHandler(PeerFrameDecoder(maxFrameBytes: config.maxFrameBytes)))
                    try channel.pipeline.syncOperations.addHandler(
                        AcceptedPeerHandler(configuration: config, logger: logger) { frame, from in
                            transport.state.withLockedValue { $0.receiver }?(frame, from)
                        })
                }
            }
            .bind(host: config.listenHost, port: config.listenPort).get()
        state.withLockedValue { $0.server = server }
        logger.info("peer port listening", metadata: ["address": "\(server.localAddress.map { "\($0)" } ?? "?")"])
    }

    /// The bound peer port.
    public var localPort: Int? { state.withLockedValue { $0.server?.localAddress?.port } }

    /// Closes the listener and every connection.
    public func stop() async {
        let channels: [any Channel] = state.withLockedValue { s in
            s.stopped = true
            var all: [any Channel] = s.server.map { [$0] } ?? []
            for c in s.connections.values { if case .ready(let ch) = c { all.append(ch) } }
            s.connections.removeAll()
            return all
        }
        for ch in channels { try? await ch.close() }
    }

    // MARK: - RaftTransport

    public func send(_ messages: [Message]) {
        var byPeer: [NodeID: [Message]] = [:]
        for m in messages { byPeer[m.to, default: []].append(m) }
        for (peer, batch) in byPeer { send(.raft(batch), to: peer, count: batch.count) }
    }

    public func send(_ chunk: SnapshotChunk) {
        send(.snapshotChunk(chunk), to: chunk.to, count: 1)
    }

    private func send(_ frame: PeerFrame, to peer: NodeID, count: Int) {
        var buffer = ByteBufferAllocator().buffer(capacity: 256)
        PeerCodec.encode(frame, into: &buffer)
        enum Next { case write(any Channel), dial(String, Int), done }
        let next: Next = state.withLockedValue { s in
            guard !s.stopped, !s.cutTo.contains(peer), let address = s.peers[peer] else {
                s.dropped += count
                return .done
            }
            switch s.connections[peer] {
            case .ready(let channel):
                if channel.isWritable { return .write(channel) }
                s.dropped += count  // back-pressure: Raft will send again
                return .done
            case .connecting(var queued, let bytes, let backoff):
                if bytes + buffer.readableBytes > Self.maxQueuedBytes {
                    s.dropped += count
                } else {
                    queued.append(buffer)
                    s.connections[peer] = .connecting(queued: queued, bytes: bytes + buffer.readableBytes, backoff: backoff)
                }
                return .done
            case .backingOff(let until, _) where NIODeadline.now() < until:
                s.dropped += count
                return .done
            case .backingOff(_, let next):
                s.connections[peer] = .connecting(queued: [buffer], bytes: buffer.readableBytes, backoff: next)
                return .dial(address.host, address.port)
            case nil:
                s.connections[peer] = .connecting(queued: [buffer], bytes: buffer.readableBytes, backoff: configuration.minBackoff)
                return .dial(address.host, address.port)
            }
        }
        switch next {
        case .write(let channel): channel.writeAndFlush(buffer, promise: nil)
        case .dial(let host, let port): connect(to: peer, host: host, port: port)
        case .done: break
        }
    }

    private func connect(to peer: NodeID, host: String, port: Int) {
        let config = configuration
        let logger = logger
        let established = group.next().makePromise(of: Void.self)
        let bootstrap = ClientBootstrap(group: group)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelOption(.writeBufferWaterMark, value: .init(low: 1 << 20, high: 8 << 20))
            .connectTimeout(.seconds(2))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls = config.tls {
                        try channel.pipeline.syncOperations.addHandler(
                            try NIOSSLClientHandler(context: tls.clientContext(), serverHostname: nil))
                    }
                    try channel.pipeline.syncOperations.addHandler(
                        ByteToMessageHandler(PeerFrameDecoder(maxFrameBytes: config.maxFrameBytes)))
                    try channel.pipeline.syncOperations.addHandler(
                        DialedPeerHandler(configuration: config, expected: peer, logger: logger, established: established))
                }
            }
        bootstrap.connect(host: host, port: port).whenComplete { result in
            switch result {
            case .failure(let error):
                established.fail(error)
                self.connectionFailed(peer, error: "\(error)")
            case .success(let channel):
                established.futureResult.whenComplete { handshake in
                    switch handshake {
                    case .success:
                        let queued = self.state.withLockedValue { s -> [ByteBuffer]? in
                            guard !s.stopped, s.peers[peer] != nil else { return nil }
                            var queued: [ByteBuffer] = []
                            if case .connecting(let q, _, _) = s.connections[peer] { queued = q }
                            s.connections[peer] = .ready(channel)
                            return queued
                        }
                        if let queued {
                            // In order, before anything sent from now on (which goes through the same event loop).
                            for b in queued { channel.write(b, promise: nil) }
                            channel.flush()
                        } else {
                            channel.close(promise: nil)
                        }
                        logger.debug("connected to peer", metadata: ["peer": "\(peer)", "address": "\(host):\(port)"])
                    case .failure(let error):
                        channel.close(promise: nil)
                        self.connectionFailed(peer, error: "\(error)")
                    }
                }
                channel.closeFuture.whenComplete { _ in
                    let onLoss = self.state.withLockedValue { s -> LossHandler? in
                        guard case .ready(let ch) = s.connections[peer], ch === channel else { return nil }
                        s.connections[peer] = .backingOff(until: .now(), next: config.minBackoff)
                        return s.stopped ? nil : s.onLoss
                    }
                    if let onLoss {
                        logger.info("lost the connection to a peer", metadata: ["peer": "\(peer)"])
                        onLoss(peer)
                    }
                }
            }
        }
    }

    private func connectionFailed(_ peer: NodeID, error: String) {
        let config = configuration
        let delay: TimeAmount = state.withLockedValue { s in
            var delay = config.minBackoff
            if case .connecting(let queued, _, let backoff) = s.connections[peer] {
                s.dropped += queued.count
                delay = backoff
            }
            s.connections[peer] = .backingOff(
                until: .now() + delay, next: min(config.maxBackoff, TimeAmount.nanoseconds(delay.nanoseconds * 2)))
            return delay
        }
        logger.debug("peer unreachable", metadata: ["peer": "\(peer)", "retryIn": "\(delay)", "error": "\(error)"])
    }
}

/// Errors of the handshake.
public enum PeerHandshakeError: Error, Sendable, CustomStringConvertible {
    case refused(String)
    case unexpected(String)
    public var description: String {
        switch self {
        case .refused(let why): return "refused by the peer: \(why)"
        case .unexpected(let what): return "handshake failed: \(what)"
        }
    }
}

/// The accepting side: checks the caller's hello, then hands every frame to `receive`.
final class AcceptedPeerHandler: ChannelInboundHandler {
    typealias InboundIn = PeerFrame
    typealias OutboundOut = ByteBuffer

    private let configuration: TCPTransport.Configuration
    private let logger: Logger
    private let receive: TCPTransport.Receiver
    private var peer: NodeID?

    init(configuration: TCPTransport.Configuration, logger: Logger, receive: @escaping TCPTransport.Receiver) {
        self.configuration = configuration
        self.logger = logger
        self.receive = receive
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = Self.unwrapInboundIn(data)
        if let peer {
            switch frame {
            case .raft, .snapshotChunk:
                receive(frame, peer)
            default:
                logger.warning("peer sent a handshake frame again; closing", metadata: ["peer": "\(peer)"])
                context.close(promise: nil)
            }
            return
        }
        guard case .hello(let version, let clusterID, let hostID) = frame else {
            refuse(context, "expected a hello first")
            return
        }
        if version != PeerFrame.protocolVersion {
            refuse(context, "protocol version \(version), this node speaks \(PeerFrame.protocolVersion)")
        } else if clusterID != configuration.clusterID {
            refuse(context, "cluster id \(hex(clusterID)), this node belongs to \(hex(configuration.clusterID))")
        } else if hostID == .none || hostID == configuration.hostID {
            refuse(context, "host id \(hostID) is not a peer of host \(configuration.hostID)")
        } else if let refusal = certificateRefusal(context, claimed: hostID) {
            refuse(context, refusal)
        } else {
            peer = hostID
            write(context, .welcome(hostID: configuration.hostID))
        }
    }

    /// With TLS: why the certificate on this connection may not speak for host `claimed`, or nil.
    private func certificateRefusal(_ context: ChannelHandlerContext, claimed: NodeID) -> String? {
        guard configuration.tls != nil else { return nil }
        return peerCertificateRefusal(context, expected: claimed)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.warning(
            "closing peer connection after a bad frame or a failed TLS handshake",
            metadata: ["address": "\(context.remoteAddress.map { "\($0)" } ?? "?")", "error": "\(error)"])
        context.close(promise: nil)
    }

    private func refuse(_ context: ChannelHandlerContext, _ reason: String) {
        logger.warning(
            "refused peer", metadata: ["address": "\(context.remoteAddress.map { "\($0)" } ?? "?")", "reason": "\(reason)"])
        write(context, .refused(reason: reason))
        context.close(promise: nil)
    }

    private func write(_ context: ChannelHandlerContext, _ frame: PeerFrame) {
        var buffer = context.channel.allocator.buffer(capacity: 64)
        PeerCodec.encode(frame, into: &buffer)
        context.writeAndFlush(Self.wrapOutboundOut(buffer), promise: nil)
    }
}

/// The dialing side: sends the hello and waits for the answer.
final class DialedPeerHandler: ChannelInboundHandler {
    typealias InboundIn = PeerFrame
    typealias OutboundOut = ByteBuffer

    private let configuration: TCPTransport.Configuration
    private let expected: NodeID
    private let logger: Logger
    private let established: EventLoopPromise<Void>
    private var done = false

    init(
        configuration: TCPTransport.Configuration, expected: NodeID, logger: Logger, established: EventLoopPromise<Void>
    ) {
        self.configuration = configuration
        self.expected = expected
        self.logger = logger
        self.established = established
    }

    func channelActive(context: ChannelHandlerContext) {
        var buffer = context.channel.allocator.buffer(capacity: 32)
        PeerCodec.encode(
            .hello(version: PeerFrame.protocolVersion, clusterID: configuration.clusterID, hostID: configuration.hostID),
            into: &buffer)
        context.writeAndFlush(Self.wrapOutboundOut(buffer), promise: nil)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = Self.unwrapInboundIn(data)
        guard !done else { return }  // nothing else is expected on a dialed connection
        done = true
        switch frame {
        case .welcome(let hostID) where hostID == expected:
            if configuration.tls != nil, let refusal = peerCertificateRefusal(context, expected: expected) {
                logger.warning("refused the peer dialed", metadata: ["peer": "\(expected)", "reason": "\(refusal)"])
                fail(context, .unexpected(refusal))
            } else {
                established.succeed(())
            }
        case .welcome(let hostID):
            fail(context, .unexpected("dialed host \(expected) but reached host \(hostID)"))
        case .refused(let reason):
            logger.warning("peer refused this node", metadata: ["peer": "\(expected)", "reason": "\(reason)"])
            fail(context, .refused(reason))
        default:
            fail(context, .unexpected("expected welcome, got \(frame)"))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !done {
            done = true
            established.fail(PeerHandshakeError.unexpected("connection closed during the handshake"))
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if !done {
            done = true
            established.fail(error)
        }
        logger.warning("closing peer connection after an error", metadata: ["peer": "\(expected)", "error": "\(error)"])
        context.close(promise: nil)
    }

    private func fail(_ context: ChannelHandlerContext, _ error: PeerHandshakeError) {
        established.fail(error)
        context.close(promise: nil)
    }
}

private func hex(_ v: UInt64) -> String { String(v, radix: 16) }

/// Why the TLS certificate the other end presented on this connection does not belong to host `expected`, or nil
/// if it does: it must carry the `host` role and name the host (`X` and 16 hex digits).
private func peerCertificateRefusal(_ context: ChannelHandlerContext, expected: NodeID) -> String? {
    guard let handler = try? context.pipeline.syncOperations.handler(type: NIOSSLHandler.self), let grant = handler.peerGrant else {
        return "no TLS certificate on the connection"
    }
    let name = "X" + String(repeating: "0", count: 16 - hex(expected).count) + hex(expected)
    guard grant.roles.contains(.host) else { return "certificate \(grant) does not carry the host role" }
    guard grant.name == name else { return "certificate \(grant) is not host \(name)'s" }
    return nil
}
