import CircuitAPI
import CircuitClient
import CircuitNode
import CircuitSecurity
import CircuitTestSupport
import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import Testing

@Suite("certificates, roles and the settings that keep plaintext on loopback")
struct SecurityUnitTests {
    @Test("a CA issues certificates whose name and roles come back from the files; keys are 0600; a CA is never overwritten")
    func authority() throws {
        let dir = try temporaryFolder("ca")
        let ca = try CertificateAuthority.create()
        try ca.write(to: dir)
        #expect(throws: SecurityError.self) { try CertificateAuthority.create().write(to: dir) }
        let loaded = try CertificateAuthority.load(directory: dir)
        #expect(loaded.certificate == ca.certificate)

        let paths = try loaded.issue(name: "alice", roles: [.read, .write], addresses: ["127.0.0.1", "localhost"])
            .write(directory: dir, name: "alice")
        for (path, mode) in [(paths.key, 0o600), (paths.certificate, 0o644), (dir + "/ca.key", 0o600)] {
            let attributes = try FileManager.default.attributesOfItem(atPath: path)
            #expect((attributes[.posixPermissions] as? Int) == mode, "\(path)")
        }
        let alice = try TLSFiles(directory: dir, name: "alice")
        #expect(alice.grant == Grant(name: "alice", roles: [.read, .write]))

        // A key that is not the certificate's is refused, naming the files.
        let other = try CertificateAuthority.create().issue(name: "mallory", roles: [.admin])
        _ = try other.write(directory: dir + "/other", name: "mallory")
        let error = #expect(throws: SecurityError.self) {
            try TLSFiles(ca: dir + "/ca.pem", certificate: paths.certificate, key: dir + "/other/mallory.key")
        }
        #expect("\(error!)".contains("alice.pem"))
        #expect(throws: SecurityError.self) { try ca.issue(name: "a/b", roles: [.read]) }
        #expect(throws: SecurityError.self) { try ca.issue(name: "nobody", roles: []) }
        #expect(throws: SecurityError.self) { try AccessRole.list("read,root") }
    }

    @Test("admin allows every client role but not the peer port; host allows everything; the others only themselves")
    func grants() {
        let admin = Grant(name: "a", roles: [.admin])
        #expect([AccessRole.read, .write, .exec, .admin].allSatisfy(admin.allows))
        #expect(!admin.allows(.host))
        #expect(AccessRole.allCases.allSatisfy(Grant(name: "X", roles: [.host]).allows))
        let reader = Grant(name: "r", roles: [.read])
        #expect(reader.allows(.read) && !reader.allows(.write) && !reader.allows(.exec) && !reader.allows(.admin))
    }

    @Test(
        "each call of the API needs its role",
        arguments: [
            ("GET", "/v1/status", AccessRole.read), ("GET", "/v1/records/a/b", .read), ("GET", "/v1/watch/records", .read),
            ("GET", "/v1/members", .read), ("GET", "/v1/wait/X0000000000000001/p", .read),
            ("PUT", "/v1/records/a", .write), ("DELETE", "/v1/records/a", .write), ("POST", "/v1/txn", .write),
            ("POST", "/v1/sessions", .write), ("PUT", "/v1/namespace/X0000000000000001/c", .write),
            ("POST", "/v1/chan/send/X0000000000000001/c", .write), ("GET", "/v1/chan/stat/X0000000000000001/c", .write),
            ("POST", "/v1/select/wait/X0000000000000001/s", .write),
            ("POST", "/v1/signal/X0000000000000001/p", .exec), ("GET", "/v1/proc/stdout/X0000000000000001/p", .exec),
            ("POST", "/v1/cluster/members", .admin), ("POST", "/v1/cluster/leader", .admin), ("GET", "/v1/debug/state", .admin),
            ("POST", "/v1/hosts/register", .host), ("PUT", "/v1/proc-state/X0000000000000001/p", .host),
            ("POST", "/v1/something-new", .write),
        ])
    func roleTable(method: String, path: String, role: AccessRole) {
        #expect(APIRoles.required(.init(method)!, path) == role)
    }

    @Test("plaintext beyond loopback is refused unless --insecure; the TLS files go together")
    func plaintextOnlyOnLoopback() throws {
        var config = NodeConfig()
        try config.validate()
        #expect(config.security == "plaintext on loopback")
        config.clientListen = "0.0.0.0:7700"
        let error = #expect(throws: NodeConfigError.self) { try config.validate() }
        #expect("\(error!)".contains("client-listen 0.0.0.0:7700 is not a loopback address"))
        config.insecure = true
        try config.validate()
        #expect(config.security.hasPrefix("INSECURE"))
        config.insecure = false
        config.tlsCA = "ca.pem"
        #expect(throws: NodeConfigError.self) { try config.validate() }
        config.tlsCert = "h.pem"
        config.tlsKey = "h.key"
        try config.validate()
        #expect(config.security == "mutual TLS")
    }
}

@Suite("a cluster speaking mutual TLS", .serialized)
struct SecurityDaemonTests {
    @Test("clients are served by role; a client without a certificate or with another CA's is refused; the cluster serves on; a member's rotated certificate is taken up on SIGHUP")
    func rolesOverTLS() async throws {
        let binary = try #require(circuitBinary(), "the circuit executable was not built next to the tests")
        let cluster = try DaemonProcesses(binary: binary, base: try temporaryFolder("tls-daemons"), count: 3)
        try cluster.enableTLS()
        try cluster.startAll()
        defer { cluster.stopAll(signal: SIGKILL) }
        let leader = try await cluster.leader()
        let hosts = try await cluster.allAlive()
        let admin = cluster.live
        #expect(try await admin.status().security == "mutual TLS")
        _ = try await admin.put("/records/app/config", Array("v1".utf8))
        let owner = try #require(hosts.first { $0.id == cluster.members[leader].folder.hostID }?.id)

        // A reader reads, and is refused a write with the role it lacks.
        let reader = CircuitClient(endpoints: cluster.apis, tls: try cluster.issueClient("reader", roles: [.read]))
        #expect(try await reader.get("/records/app/config").value == "v1")
        let refusal = await refusalMessage { _ = try await reader.put("/records/app/config", Array("v2".utf8)) }
        #expect(refusal?.contains("needs the write role") == true, "\(refusal ?? "not refused")")
        #expect(refusal?.contains("reader carries read") == true, "\(refusal ?? "not refused")")

        // A writer writes records and makes channels, and may not start a process.
        let writer = CircuitClient(endpoints: cluster.apis, tls: try cluster.issueClient("writer", roles: [.write]))
        _ = try await writer.put("/records/app/config", Array("v2".utf8))
        _ = try await writer.makeChannel("/\(owner)/jobs", capacity: 4)
        let noExec = await refusalMessage { _ = try await writer.run("/\(owner)/p1", ProcCommandView(path: "/bin/true")) }
        #expect(noExec?.contains("needs the exec role") == true, "\(noExec ?? "not refused")")
        let noAdmin = await refusalMessage { _ = try await writer.stateSnapshot() }
        #expect(noAdmin?.contains("needs the admin role") == true, "\(noAdmin ?? "not refused")")

        // An operator with exec runs it, through any member.
        let operatorClient = CircuitClient(endpoints: cluster.apis.reversed(), tls: try cluster.issueClient("operator", roles: [.read, .exec]))
        _ = try await operatorClient.run("/\(owner)/p1", ProcCommandView(path: "/bin/true"))
        #expect(try await operatorClient.wait("/\(owner)/p1").exitCode == 0)

        // No certificate, or another CA's: the connection is refused (and logged with the address).
        var plaintext = CircuitClient(endpoints: [cluster.members[0].api], tls: nil)
        plaintext.timeout = 3
        await #expect(throws: CircuitClientError.self) { _ = try await plaintext.status() }
        let strangerFolder = try temporaryFolder("stranger")
        let strangerCA = try CertificateAuthority.create()
        _ = try strangerCA.issue(name: "stranger", roles: [.admin]).write(directory: strangerFolder, name: "stranger")
        var stranger = CircuitClient(endpoints: [cluster.members[0].api], tls: try TLSFiles(directory: strangerFolder, name: "stranger"))
        stranger.timeout = 3
        await #expect(throws: CircuitClientError.self) { _ = try await stranger.put("/records/app/config", Array("evil".utf8)) }
        try await eventually("member 0 to log the refused TLS connection with its address") {
            cluster.logTail(0, lines: 400).contains("refused a TLS connection")
        }

        // The cluster served on: the last acknowledged value is there.
        #expect(try await admin.get("/records/app/config").value == "v2")

        // Rotation: member 1 gets a new certificate (a new key), is told with SIGHUP, and serves it to new
        // connections.
        let member = cluster.members[1]
        let before = try await servedCertificate(member.api, tls: try #require(cluster.tls))
        _ = try CertificateAuthority.load(directory: cluster.tlsFolder).issue(name: member.folder.hostID, roles: [.host])
            .write(directory: cluster.tlsFolder, name: member.folder.hostID)
        let fresh = try NIOSSLCertificate.fromPEMFile("\(cluster.tlsFolder)/\(member.folder.hostID).pem")[0]
        #expect(fresh != before)
        kill(try #require(member.process).processIdentifier, SIGHUP)
        try await eventually("member 1 to serve its new certificate") {
            (try? await servedCertificate(member.api, tls: cluster.tls!)) == fresh
        }
        #expect(cluster.logTail(1, lines: 400).contains("reloaded the TLS certificate"))
        #expect(try await cluster.client(1).get("/records/app/config").value == "v2")

        // A worker joins with its host certificate, relays its clients' requests to the members, and checks their
        // roles itself: the reader is refused a write there too.
        try cluster.add(join: cluster.members[leader].api, as: "worker")
        try cluster.start(3)
        _ = try await cluster.allAlive()
        try await eventually("the worker serving its API", timeout: .seconds(20)) { (try? await cluster.client(3).status()) != nil }
        #expect(try await cluster.client(3).status().security == "mutual TLS")
        let readerAtWorker = CircuitClient(endpoints: [cluster.members[3].api], tls: reader.tls)
        #expect(try await readerAtWorker.get("/records/app/config").value == "v2")
        let atWorker = await refusalMessage { _ = try await readerAtWorker.put("/records/app/config", Array("v3".utf8)) }
        #expect(atWorker?.contains("needs the write role") == true, "\(atWorker ?? "not refused")")
    }
}

/// The message of the API error `body` failed with, or nil if it succeeded.
private func refusalMessage(_ body: () async throws -> Void) async -> String? {
    do { try await body() } catch {
        if case .api(let e)? = error as? CircuitClientError { return "\(e.code): \(e.message)" }
        return "\(error)"
    }
    return nil
}

/// The certificate the API at `address` presents to a new connection.
private func servedCertificate(_ address: String, tls: TLSFiles) async throws -> NIOSSLCertificate? {
    let (host, port) = try NodeConfig.address(address, "api")
    let handshake = MultiThreadedEventLoopGroup.singleton.next().makePromise(of: NIOSSLCertificate?.self)
    let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: tls.clientContext(), serverHostname: nil))
                try channel.pipeline.syncOperations.addHandler(HandshakeWatcher(done: handshake))
            }
        }
        .connect(host: host, port: port).get()
    defer { channel.close(promise: nil) }
    return try await handshake.futureResult.get()
}

private final class HandshakeWatcher: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    let done: EventLoopPromise<NIOSSLCertificate?>
    init(done: EventLoopPromise<NIOSSLCertificate?>) { self.done = done }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event {
            done.succeed(try? context.pipeline.syncOperations.nioSSL_peerCertificate())
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        done.fail(error)
        context.close(promise: nil)
    }
}
