import CircuitSecurity
import Foundation
import TOMLKit

/// A daemon's settings: from a TOML file (see `config/`), then flags on top.
public struct NodeConfig: Codable, Sendable, Equatable {
    /// The data folder: identity, Raft log, snapshots.
    public var data: String = "circuit-data"
    /// Where the peer (Raft) port listens, `host:port`.
    public var peerListen: String = "127.0.0.1:7701"
    /// The peer address other hosts dial (default: `peerListen`).
    public var peerAdvertise: String?
    /// Where the HTTP/JSON API listens, `host:port`.
    public var clientListen: String = "127.0.0.1:7700"
    /// The API address other hosts and clients use (default: `clientListen`).
    public var clientAdvertise: String?
    /// Form a new cluster of these voters, each `X<16 hex>@host:port` (peer address); this host must be one of
    /// them. Ignored once the data folder belongs to a cluster.
    public var bootstrap: [String] = []
    /// Join the cluster of the member whose API is at this `host:port`. Ignored once the data folder belongs to a
    /// cluster.
    public var join: String?
    /// What a joining host becomes: a `learner` (in Raft, receives the log, can be promoted to voter) or a `worker`
    /// (in the membership only: no log, its API relays to the members; what most hosts of a large cluster are).
    public var joinAs: String = "learner"
    /// A voter whose host has not been alive for this long is replaced by a caught-up learner (the leader promotes
    /// one, then removes the lost voter), so that the cluster keeps 3 or 5 voters. 0 turns it off.
    public var voterReplaceAfterMillis: UInt64 = 30_000
    /// How long a host's session lives without a keep-alive, in milliseconds.
    public var sessionTTLMillis: UInt64 = 5000
    /// Tests only (`--test-faults`, never from a config file): `PUT /v1/debug/cut` may cut this node's Raft traffic
    /// with chosen peers, the chaos suite's partitions where network namespaces cannot be made.
    public var testFaults = false
    /// Raft's tick; heartbeats every tick, elections after 10 to 20 ticks of silence.
    public var tickMillis: Int = 50
    /// Take a snapshot of the control state and compact the Raft log once this many entries were applied since the
    /// last one (and their bytes reach a quarter of that snapshot's size, so a large state is not written out again
    /// for every few thousand entries): the log, which is also held in memory, is about this long or less between
    /// snapshots while the state is small. etcd's `snapshot-count` is 100,000. A follower behind the last snapshot
    /// gets the snapshot instead of the entries.
    public var snapshotEntries: UInt64 = 20_000
    /// Make the Raft log durable on a writer thread of its own while the protocol goes on (etcd's asynchronous
    /// storage writes): the loop that steps messages never waits for fsync, and what queues up during one fsync is
    /// written with the next. Nothing is acknowledged or applied before it is durable either way. Default on.
    public var asyncStorageWrites = true
    /// How long a scrubbed process has between SIGTERM (to its process group) and SIGKILL.
    public var scrubGraceMillis: Int64 = 2000
    /// The largest channel message, in bytes.
    public var maxMessageBytes: Int = 1 << 20
    /// The most `max-message-bytes` may be: messages are held whole in memory, and framed with 4-byte lengths.
    public static let largestMessageLimit = 1 << 30
    /// The most bytes all of this host's channel buffers hold together.
    public var maxBufferedBytes: Int = 256 << 20
    /// Per-client limits (a client is the name in its certificate, or its address without TLS; members relaying
    /// for one count as it): the sessions it may hold in the cluster, and on this node the watches (and waits) and
    /// the requests (streams included) it may have open at once. Past one, a 429 names the limit.
    public var maxSessionsPerClient: Int = 1024
    public var maxWatchesPerClient: Int = 256
    public var maxStreamsPerClient: Int = 1024
    /// Mount the cluster as a file system here while the daemon runs (`circuit mount`'s layout); nil: no mount.
    public var mount: String?
    /// The client identity the mount acts with (a certificate of the cluster's CA and its key; both or neither):
    /// by default the host's own, which may do everything. Give one with fewer roles (`circuit ca issue --client
    /// NAME --role read`) to limit what the mount's users may do.
    public var mountTLSCert: String?
    public var mountTLSKey: String?
    /// Let users other than the daemon's use the mount (FUSE's `allow_other`). Off: the mount is its owner's alone.
    public var mountAllowOther = false
    /// Mutual TLS on the peer port and the API: the cluster's CA certificate, this host's certificate (issued by
    /// `circuit ca issue --host`, named for its host id, with the `host` role) and its key. All three or none.
    public var tlsCA: String?
    public var tlsCert: String?
    public var tlsKey: String?
    /// The CA's private key (`ca.key`), on the members that may create join tokens (`circuit token create`) and
    /// issue certificates to the hosts that join with one. Needs TLS; the key must be `tls-ca`'s.
    public var tlsCAKey: String?
    /// A folder for this host's TLS files, instead of tls-ca, tls-cert and tls-key: `ca.pem`, `<host id>.pem` and
    /// `<host id>.key`. A new host joining with `join-token` gets them from the cluster and writes them here; every
    /// later start finds them here (give the same folder again).
    public var tlsDir: String?
    /// A join token (`circuit token create`): with `join` and `tls-dir`, a new host gets its certificate from the
    /// cluster in the join exchange. Ignored once the TLS files are in `tls-dir`.
    public var joinToken: String?
    /// Plaintext on an address other than loopback: refused unless this is set, and then said at start and in
    /// `status`. Anyone who reaches the ports can run processes on the host.
    public var insecure = false

    enum CodingKeys: String, CodingKey {
        case data
        case peerListen = "peer-listen"
        case peerAdvertise = "peer-advertise"
        case clientListen = "client-listen"
        case clientAdvertise = "client-advertise"
        case bootstrap, join
        case joinAs = "join-as"
        case voterReplaceAfterMillis = "voter-replace-after-ms"
        case sessionTTLMillis = "session-ttl-ms"
        case tickMillis = "tick-ms"
        case scrubGraceMillis = "scrub-grace-ms"
        case snapshotEntries = "snapshot-entries"
        case asyncStorageWrites = "async-storage-writes"
        case maxMessageBytes = "max-message-bytes"
        case maxBufferedBytes = "max-buffered-bytes"
        case maxSessionsPerClient = "max-sessions-per-client"
        case maxWatchesPerClient = "max-watches-per-client"
        case maxStreamsPerClient = "max-streams-per-client"
        case mount
        case mountTLSCert = "mount-tls-cert"
        case mountTLSKey = "mount-tls-key"
        case mountAllowOther = "mount-allow-other"
        case tlsCA = "tls-ca"
        case tlsCert = "tls-cert"
        case tlsKey = "tls-key"
        case tlsCAKey = "tls-ca-key"
        case tlsDir = "tls-dir"
        case joinToken = "join-token"
        case insecure
    }

    public init() {}

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = NodeConfig()
        data = try c.decodeIfPresent(String.self, forKey: .data) ?? d.data
        peerListen = try c.decodeIfPresent(String.self, forKey: .peerListen) ?? d.peerListen
        peerAdvertise = try c.decodeIfPresent(String.self, forKey: .peerAdvertise)
        clientListen = try c.decodeIfPresent(String.self, forKey: .clientListen) ?? d.clientListen
        clientAdvertise = try c.decodeIfPresent(String.self, forKey: .clientAdvertise)
        bootstrap = try c.decodeIfPresent([String].self, forKey: .bootstrap) ?? d.bootstrap
        join = try c.decodeIfPresent(String.self, forKey: .join)
        joinAs = try c.decodeIfPresent(String.self, forKey: .joinAs) ?? d.joinAs
        voterReplaceAfterMillis = try c.decodeIfPresent(UInt64.self, forKey: .voterReplaceAfterMillis) ?? d.voterReplaceAfterMillis
        sessionTTLMillis = try c.decodeIfPresent(UInt64.self, forKey: .sessionTTLMillis) ?? d.sessionTTLMillis
        tickMillis = try c.decodeIfPresent(Int.self, forKey: .tickMillis) ?? d.tickMillis
        scrubGraceMillis = try c.decodeIfPresent(Int64.self, forKey: .scrubGraceMillis) ?? d.scrubGraceMillis
        snapshotEntries = try c.decodeIfPresent(UInt64.self, forKey: .snapshotEntries) ?? d.snapshotEntries
        asyncStorageWrites = try c.decodeIfPresent(Bool.self, forKey: .asyncStorageWrites) ?? d.asyncStorageWrites
        maxMessageBytes = try c.decodeIfPresent(Int.self, forKey: .maxMessageBytes) ?? d.maxMessageBytes
        maxBufferedBytes = try c.decodeIfPresent(Int.self, forKey: .maxBufferedBytes) ?? d.maxBufferedBytes
        maxSessionsPerClient = try c.decodeIfPresent(Int.self, forKey: .maxSessionsPerClient) ?? d.maxSessionsPerClient
        maxWatchesPerClient = try c.decodeIfPresent(Int.self, forKey: .maxWatchesPerClient) ?? d.maxWatchesPerClient
        maxStreamsPerClient = try c.decodeIfPresent(Int.self, forKey: .maxStreamsPerClient) ?? d.maxStreamsPerClient
        mount = try c.decodeIfPresent(String.self, forKey: .mount)
        mountTLSCert = try c.decodeIfPresent(String.self, forKey: .mountTLSCert)
        mountTLSKey = try c.decodeIfPresent(String.self, forKey: .mountTLSKey)
        mountAllowOther = try c.decodeIfPresent(Bool.self, forKey: .mountAllowOther) ?? d.mountAllowOther
        tlsCA = try c.decodeIfPresent(String.self, forKey: .tlsCA)
        tlsCert = try c.decodeIfPresent(String.self, forKey: .tlsCert)
        tlsKey = try c.decodeIfPresent(String.self, forKey: .tlsKey)
        tlsCAKey = try c.decodeIfPresent(String.self, forKey: .tlsCAKey)
        tlsDir = try c.decodeIfPresent(String.self, forKey: .tlsDir)
        joinToken = try c.decodeIfPresent(String.self, forKey: .joinToken)
        insecure = try c.decodeIfPresent(Bool.self, forKey: .insecure) ?? d.insecure
    }

    /// Reads a TOML file; an unknown key or a wrong type is an error naming it.
    public init(tomlFile path: String) throws {
        let text = try String(contentsOfFile: path, encoding: .utf8)
        let table = try TOMLTable(string: text)
        let known = Set(CodingKeys.allCases.map(\.rawValue))
        for key in table.keys where !known.contains(key) {
            throw NodeConfigError.invalid("unknown setting \"\(key)\" in \(path)")
        }
        do {
            self = try TOMLDecoder().decode(NodeConfig.self, from: table)
        } catch {
            throw NodeConfigError.invalid("\(path): \(error)")
        }
    }

    public var advertisedPeer: String { peerAdvertise ?? peerListen }
    public var advertisedClient: String { clientAdvertise ?? clientListen }

    /// Checks the addresses and the bootstrap list.
    public func validate() throws {
        _ = try Self.address(peerListen, "peer-listen")
        _ = try Self.address(clientListen, "client-listen")
        _ = try Self.address(advertisedPeer, "peer-advertise")
        _ = try Self.address(advertisedClient, "client-advertise")
        _ = try bootstrapVoters()
        if let join { _ = try Self.address(join, "join") }
        guard joinAs == "learner" || joinAs == "worker" else {
            throw NodeConfigError.invalid("join-as: \"\(joinAs)\" is neither learner nor worker")
        }
        guard snapshotEntries >= 100 else {
            throw NodeConfigError.invalid("snapshot-entries must be at least 100, not \(snapshotEntries)")
        }
        guard maxMessageBytes > 0, maxBufferedBytes >= maxMessageBytes else {
            throw NodeConfigError.invalid("max-message-bytes must be positive and no more than max-buffered-bytes")
        }
        // A message's length is framed in 4 bytes, and 0xFFFFFFFF marks a failed stream of receives.
        guard maxMessageBytes <= Self.largestMessageLimit else {
            throw NodeConfigError.invalid("max-message-bytes must be at most \(Self.largestMessageLimit) (1 GiB), not \(maxMessageBytes)")
        }
        for (what, value) in [
            ("max-sessions-per-client", maxSessionsPerClient), ("max-watches-per-client", maxWatchesPerClient),
            ("max-streams-per-client", maxStreamsPerClient),
        ] where value < 1 {
            throw NodeConfigError.invalid("\(what) must be at least 1, not \(value)")
        }
        if join != nil && !bootstrap.isEmpty { throw NodeConfigError.invalid("--join and --bootstrap exclude each other") }
        let tlsFiles = [tlsCA, tlsCert, tlsKey].compactMap { $0 }
        guard tlsFiles.isEmpty || tlsFiles.count == 3 else {
            throw NodeConfigError.invalid("tls-ca, tls-cert and tls-key go together: give all three or none")
        }
        if tlsDir != nil && !tlsFiles.isEmpty {
            throw NodeConfigError.invalid(
                "tls-dir and tls-ca, tls-cert, tls-key exclude each other: tls-dir holds ca.pem, <host id>.pem and <host id>.key")
        }
        if joinToken != nil {
            guard join != nil else { throw NodeConfigError.invalid("join-token is for a host that joins: give --join too (or `circuit join ADDRESS`)") }
            guard tlsDir != nil else {
                throw NodeConfigError.invalid("join-token needs tls-dir: the folder where the certificate the cluster issues is written")
            }
        }
        guard (mountTLSCert == nil) == (mountTLSKey == nil) else {
            throw NodeConfigError.invalid("mount-tls-cert and mount-tls-key go together: give both or neither")
        }
        if mountTLSCert != nil && !usesTLS {
            throw NodeConfigError.invalid("mount-tls-cert needs TLS: the mount's identity is a certificate of the cluster's CA")
        }
        if tlsCAKey != nil && !usesTLS {
            throw NodeConfigError.invalid("tls-ca-key needs TLS: give tls-ca, tls-cert and tls-key (the key must be tls-ca's), or tls-dir")
        }
        if !usesTLS && !insecure {
            for (what, address) in [("peer-listen", peerListen), ("client-listen", clientListen)] {
                let host = try Self.address(address, what).host
                guard Self.isLoopback(host) else {
                    throw NodeConfigError.invalid(
                        "\(what) \(address) is not a loopback address: refusing to listen there without TLS, since whoever "
                            + "reaches the port can run processes on this host. Give --tls-ca, --tls-cert and --tls-key "
                            + "(circuit ca init, circuit ca issue), or --tls-dir with a join token (circuit token create), "
                            + "or --insecure to accept the risk")
                }
            }
        }
    }

    /// Whether the peer port and the API speak mutual TLS.
    public var usesTLS: Bool { (tlsCA != nil && tlsCert != nil && tlsKey != nil) || tlsDir != nil }

    /// The TLS files of host `hostID`: tls-ca, tls-cert and tls-key, or those in tls-dir (`ca.pem`, `<host id>.pem`,
    /// `<host id>.key`); nil without TLS.
    public func tlsFiles(hostID: String) -> (ca: String, certificate: String, key: String)? {
        if let tlsCA, let tlsCert, let tlsKey { return (tlsCA, tlsCert, tlsKey) }
        guard let tlsDir else { return nil }
        return (tlsDir + "/" + CertificateAuthority.certificateFile, tlsDir + "/" + hostID + ".pem", tlsDir + "/" + hostID + ".key")
    }

    /// How this daemon's ports are protected, in words (logged at start, shown by `status`).
    public var security: String {
        if usesTLS { return "mutual TLS" }
        let loopback = [peerListen, clientListen].allSatisfy { (try? Self.address($0, "")).map { Self.isLoopback($0.host) } ?? false }
        return loopback ? "plaintext on loopback" : "INSECURE: plaintext beyond loopback"
    }

    /// 127.0.0.0/8, ::1 and localhost.
    public static func isLoopback(_ host: String) -> Bool {
        host == "localhost" || host == "::1" || host == "[::1]" || host.hasPrefix("127.")
    }

    /// The bootstrap voters: host id → peer address.
    public func bootstrapVoters() throws -> [(host: String, address: String)] {
        try bootstrap.map { entry in
            let parts = entry.split(separator: "@", maxSplits: 1).map(String.init)
            guard parts.count == 2, HostID.isValid(parts[0]) else {
                throw NodeConfigError.invalid("bootstrap entry \(entry.debugDescription) is not X<16 hex digits>@host:port")
            }
            _ = try Self.address(parts[1], "bootstrap entry \(entry)")
            return (parts[0], parts[1])
        }
    }

    /// Splits `host:port`.
    public static func address(_ s: String, _ what: String) throws -> (host: String, port: Int) {
        guard let colon = s.lastIndex(of: ":"), let port = Int(s[s.index(after: colon)...]), (0...65535).contains(port),
            colon != s.startIndex
        else { throw NodeConfigError.invalid("\(what): \(s.debugDescription) is not host:port") }
        return (String(s[..<colon]), port)
    }
}

extension NodeConfig.CodingKeys: CaseIterable {}

public enum NodeConfigError: Error, Sendable, CustomStringConvertible {
    case invalid(String)
    public var description: String {
        switch self {
        case .invalid(let why): return why
        }
    }
}
