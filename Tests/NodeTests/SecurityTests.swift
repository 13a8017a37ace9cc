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
import Synchronization
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
            ("POST", "/v1/tokens", .admin), ("GET", "/v1/tokens", .admin),
            ("POST", "/v1/something-new", .write),
        ])
    func roleTable(method: String, path: String, role: AccessRole) {
        #expect(APIRoles.required(.init(method)!, path) == role)
    }

    @Test(
        "only the join exchange's two calls are served without a certificate",
        arguments: [
            ("GET", "/v1/join/ca", true), ("POST", "/v1/join/certificate", true),
            ("POST", "/v1/join/ca", false), ("GET", "/v1/join/certificate", false), ("GET", "/v1/join/ca/x", false),
            ("POST", "/v1/join", false), ("POST", "/v1/tokens", false), ("GET", "/v1/status", false),
            ("POST", "/v1/cluster/members", false),
        ])
    func publicCalls(method: String, path: String, isPublic: Bool) {
        #expect(APIRoles.isPublic(.init(method)!, path) == isPublic)
    }

    @Test("a join token verifies before its expiry and not after; altered in any part, made by another CA, or malformed, it is refused naming why")
    func joinTokens() throws {
        let ca = try CertificateAuthority.create()
        let now = Date(timeIntervalSince1970: 1_750_000_000)
        let text = JoinToken.create(ttl: 600, authority: ca, now: now)
        let token = try JoinToken.verify(text, authority: ca, now: now)
        #expect(token.expires == 1_750_000_600 && token.text == text && token.caDigest == ca.certificateDigest)
        _ = try JoinToken.verify(text, authority: ca, now: now + 599)
        _ = try JoinToken.verify(text + "\n", authority: ca, now: now)  // as pasted
        #expect(JoinToken.create(ttl: 600, authority: ca, now: now) != text, "each token is new")
        let expired = #expect(throws: SecurityError.self) { try JoinToken.verify(text, authority: ca, now: now + 600) }
        #expect("\(expired!)".contains("expired at"), "\(expired!)")

        // Any part altered: the expiry, the random part, the MAC, the CA's digest.
        let parts = text.split(separator: ".").map(String.init)
        #expect(parts.count == 4)
        for i in parts.indices {
            var altered = parts
            let first: String = altered[i].first == "1" ? "2" : "1"
            altered[i] = first + altered[i].dropFirst()
            let error = #expect(throws: SecurityError.self) {
                try JoinToken.verify(altered.joined(separator: "."), authority: ca, now: now)
            }
            #expect("\(error!)".contains("not signed by this cluster's CA"), "part \(i): \(error!)")
        }

        // Another CA's token, as it is, or claiming this CA.
        let other = try CertificateAuthority.create()
        let theirs = JoinToken.create(ttl: 600, authority: other, now: now)
        let claimed = theirs.split(separator: ".").prefix(3).joined(separator: ".") + "." + ca.certificateDigest
        for foreign in [theirs, claimed] {
            let error = #expect(throws: SecurityError.self) { try JoinToken.verify(foreign, authority: ca, now: now) }
            #expect("\(error!)".contains("not signed by this cluster's CA"), "\(error!)")
        }

        // Malformed: parts missing or extra, not hex, not canonical.
        for bad in [
            "", "token", "1.2.3", text + ".x", "1750000600.zz.\(parts[2]).\(parts[3])", text.uppercased(),
            "0\(text)", "+\(text)", "-\(text)", "\(parts[0]).\(parts[1].dropLast(2)).\(parts[2]).\(parts[3])",
        ] {
            let error = #expect(throws: SecurityError.self) { try JoinToken.verify(bad, authority: ca, now: now) }
            #expect("\(error!)".contains("malformed"), "\(bad.debugDescription): \(error!)")
        }

        // The joining host pins the CA the token names among what it is offered.
        #expect(token.pinnedCA(in: other.certificatePEM + "\n" + ca.certificatePEM) != nil)
        #expect(token.pinnedCA(in: other.certificatePEM) == nil)
        #expect(token.pinnedCA(in: "not PEM") == nil)
    }

    @Test("a certificate request names a host and proves its key; the CA signs it with the host role, the key never leaving")
    func certificateRequests() throws {
        let dir = try temporaryFolder("csr")
        let ca = try CertificateAuthority.create()
        let id = "X0123456789abcdef"
        let made = try CertificateRequest.make(commonName: id)
        let request = try CertificateRequest(pem: made.request)
        #expect(request.commonName == id)
        let certificate = try ca.issue(request, roles: [.host])
        _ = try IssuedCertificate(certificatePEM: certificate, keyPEM: made.keyPEM, caPEM: ca.certificatePEM).write(directory: dir, name: id)
        #expect(try TLSFiles(directory: dir, name: id).grant == Grant(name: id, roles: [.host]))

        // Not a request; a request whose signature was altered (its last byte, in the signature's s).
        #expect(throws: SecurityError.self) { try CertificateRequest(pem: ca.certificatePEM) }
        #expect(throws: SecurityError.self) { try CertificateRequest(pem: "not a request") }
        let body = made.request.split(separator: "\n").filter { !$0.hasPrefix("-----") }.joined()
        var der = [UInt8](try #require(Data(base64Encoded: body)))
        der[der.count - 1] ^= 0x01
        var base64 = Substring(Data(der).base64EncodedString())
        var lines: [String] = []
        while !base64.isEmpty {
            lines.append(String(base64.prefix(64)))
            base64 = base64.dropFirst(64)
        }
        let tampered = (["-----BEGIN CERTIFICATE REQUEST-----"] + lines + ["-----END CERTIFICATE REQUEST-----"]).joined(separator: "\n")
        let error = #expect(throws: SecurityError.self) { try CertificateRequest(pem: tampered) }
        #expect("\(error!)".contains("signature"), "\(error!)")
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

    @Test("the CA key needs TLS; tls-dir stands for the three files; a join token goes with join and tls-dir")
    func tokenSettings() throws {
        var config = NodeConfig()
        config.tlsCAKey = "ca.key"
        let noTLS = #expect(throws: NodeConfigError.self) { try config.validate() }
        #expect("\(noTLS!)".contains("tls-ca-key needs TLS"))
        config.tlsDir = "/etc/circuit/tls"
        config.clientListen = "0.0.0.0:7700"
        try config.validate()
        #expect(config.security == "mutual TLS")
        #expect(config.tlsFiles(hostID: "X0000000000000001")?.certificate == "/etc/circuit/tls/X0000000000000001.pem")
        #expect(config.tlsFiles(hostID: "X0000000000000001")?.key == "/etc/circuit/tls/X0000000000000001.key")
        #expect(config.tlsFiles(hostID: "X0000000000000001")?.ca == "/etc/circuit/tls/ca.pem")
        config.tlsCA = "ca.pem"
        config.tlsCert = "h.pem"
        config.tlsKey = "h.key"
        #expect(throws: NodeConfigError.self) { try config.validate() }
        config.tlsDir = nil
        try config.validate()
        config.joinToken = "a token"
        let noJoin = #expect(throws: NodeConfigError.self) { try config.validate() }
        #expect("\(noJoin!)".contains("join-token"))
        config.join = "10.0.0.1:7700"
        let noDir = #expect(throws: NodeConfigError.self) { try config.validate() }
        #expect("\(noDir!)".contains("tls-dir"))
        config.tlsCA = nil
        config.tlsCert = nil
        config.tlsKey = nil
        config.tlsCAKey = nil
        config.tlsDir = "/var/lib/circuit/tls"
        try config.validate()
    }
}

@Suite("a cluster speaking mutual TLS", .serialized)
struct SecurityDaemonTests {
    @Test("clients are served by role; a client without a certificate or with another CA's is refused; the cluster serves on; a member's rotated certificate is taken up on SIGHUP")
    func rolesOverTLS() async throws {
        let binary = try #require(circuitBinary(), "the circuit executable was not built next to the tests")
        let cluster = try DaemonProcesses(binary: binary, base: try temporaryFolder("tls-daemons"), count: 3, sessionTTLMillis: loadedMachineTTL)
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
        // A streamed send over TLS whose first message is too large, its producer then idle: the host's refusal,
        // sent as soon as it reads the length, ends it at once (the idle producer cancelled, the connection reset
        // below TLS).
        let streamer = CircuitClient(endpoints: cluster.apis, tls: try cluster.issueClient("streamer", roles: [.read, .write]))
        let jobs = try await streamer.channel("/\(owner)/jobs")
        let (idle, idleProducer) = AsyncStream.makeStream(of: ByteBuffer.self)
        idleProducer.yield(ByteBuffer(repeating: 0x6a, count: (1 << 20) + 1))
        let sending = ContinuousClock.now
        #expect(await apiCode { try await jobs.send(streaming: idle) } == "too_large")
        // Alone it takes some 30 ms, also beside two busy loops; in full runs of the suite it took 5.4 s once here and
        // 8.2 s once in CI: a 5 s wait (NIOSSL's close_notify timeout) is hit on some path of this refusal, not yet
        // found (an open bug, in the note). The bound only says that the refusal comes, and not after both sides'
        // TLS timeouts.
        #expect(ContinuousClock.now - sending < .seconds(15), "the refusal took \(ContinuousClock.now - sending)")
        idleProducer.finish()
        let noExec = await refusalMessage { _ = try await writer.run("/\(owner)/p1", ProcCommandView(path: "/bin/true")) }
        #expect(noExec?.contains("needs the exec role") == true, "\(noExec ?? "not refused")")
        let noAdmin = await refusalMessage { _ = try await writer.stateSnapshot() }
        #expect(noAdmin?.contains("needs the admin role") == true, "\(noAdmin ?? "not refused")")

        // The binary protocol on the same port, over TLS, checks the same roles.
        let wireReader = try await WireConnection.connect(to: cluster.members[0].api, tls: reader.tls)
        #expect(try await wireReader.get("/records/app/config").value == Array("v2".utf8))
        do {
            try await wireReader.put("/records/app/config", Array("v3".utf8))
            Issue.record("a reader wrote through the wire")
        } catch {
            #expect("\(error)".contains("need the write role") && "\(error)".contains("reader carries read"), "\(error)")
        }
        await wireReader.close()
        let wireWriter = try await WireConnection.connect(to: cluster.members[1].api, tls: writer.tls)
        #expect(try await wireWriter.put("/records/app/wire", Array("w".utf8)).version == 1)
        await wireWriter.close()

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
        // A worker holds no control state: a wire connection is told to go to a member.
        let wireAtWorker = try await WireConnection.connect(to: cluster.members[3].api, tls: reader.tls)
        #expect(await apiCode { _ = try await wireAtWorker.get("/records/app/config") } == "not_a_member")
        await wireAtWorker.close()
    }

    @Test("a host joins with a join token and no certificate: the cluster issues it; an expired, forged or foreign token is refused, and the refusal logged with the address; the cluster serves on")
    func joinWithToken() async throws {
        let binary = try #require(circuitBinary(), "the circuit executable was not built next to the tests")
        let cluster = try DaemonProcesses(binary: binary, base: try temporaryFolder("token-daemons"), count: 3, sessionTTLMillis: loadedMachineTTL)
        try cluster.enableTLS()
        try cluster.startAll()
        defer { cluster.stopAll(signal: SIGKILL) }
        let leader = try await cluster.leader()
        _ = try await cluster.allAlive()
        let admin = cluster.live
        _ = try await admin.put("/records/app/config", Array("v1".utf8))

        // An admin gets a token from any member holding the CA key; a reader is refused, naming the admin role.
        let contact = (leader + 1) % 3
        let created = try await cluster.client(contact).createToken(ttlSeconds: 600)
        let now = Int64(Date().timeIntervalSince1970)
        #expect(created.expires > now + 590 && created.expires <= now + 600, "expires \(created.expires), now \(now)")
        let reader = CircuitClient(endpoints: cluster.apis, tls: try cluster.issueClient("reader", roles: [.read]))
        let refusal = await refusalMessage { _ = try await reader.createToken(ttlSeconds: 600) }
        #expect(refusal?.contains("needs the admin role") == true, "\(refusal ?? "not refused")")

        // Without a certificate, a client gets the CA (the one the token names) and nothing else.
        let bare = try JoinTLS.unverified()
        let offered = try await HTTPExchange.perform(.GET, "/v1/join/ca", to: cluster.members[0].api, tls: nil, sslContext: bare)
        #expect(offered.status == 200)
        #expect(try JoinToken.parse(created.token).pinnedCA(in: String(decoding: offered.body, as: UTF8.self)) != nil)
        let status = try await HTTPExchange.perform(.GET, "/v1/status", to: cluster.members[0].api, tls: nil, sslContext: bare)
        #expect(status.status == 401 && String(decoding: status.body, as: UTF8.self).contains("no_certificate"))

        // A learner joins with the token: the cluster issued its certificate (the key 0600, never sent), it is alive.
        try cluster.add(join: cluster.members[contact].api, token: created.token)
        try cluster.start(3)
        let hosts = try await cluster.allAlive(timeout: .seconds(60))
        // Registered (by the join) before its API listens, and it forwards reads once it has applied the leader's
        // registration: wait for a linearizable read through it.
        try await eventually("the joiner serving a linearizable read", timeout: .seconds(20)) {
            (try? await cluster.client(3).get("/records/app/config"))?.value == "v1"
        }
        let joiner = cluster.members[3]
        let id = joiner.folder.hostID
        #expect(hosts.contains { $0.id == id && $0.role == "learner" && $0.state == "alive" })
        for (file, mode) in [("ca.pem", 0o644), ("\(id).pem", 0o644), ("\(id).key", 0o600)] {
            let attributes = try FileManager.default.attributesOfItem(atPath: "\(joiner.tokenTLSFolder)/\(file)")
            #expect((attributes[.posixPermissions] as? Int) == mode, "\(file)")
        }
        #expect(try TLSFiles(directory: joiner.tokenTLSFolder, name: id).grant == Grant(name: id, roles: [.host]))
        #expect(try await cluster.client(3).status().security == "mutual TLS")
        #expect(cluster.logTail(contact, lines: 5000).contains("issued a host certificate for a join token"))
        // A member without the CA key creates no tokens.
        let noKey = await refusalMessage { _ = try await cluster.client(3).createToken(ttlSeconds: 60) }
        #expect(noKey?.contains("no_ca_key") == true, "\(noKey ?? "not refused")")

        // Restarted, it finds its files in --tls-dir: no second certificate.
        cluster.kill9(3)
        try cluster.start(3)
        try await eventually("the joiner to serve again after its restart", timeout: .seconds(30)) {
            (try? await cluster.client(3).status()) != nil
        }
        let issued = cluster.logTail(3, lines: 5000).components(separatedBy: "the cluster issued this host's certificate").count - 1
        #expect(issued == 1, "the joiner's log tells of \(issued) certificates")

        // Expired, forged (a MAC altered) and another CA's tokens: the joiner's daemon fails, naming why; the first two
        // reach the member, which refuses them and logs it with the joiner's address; the third names a CA the joiner
        // does not find at the contact, so it sends nothing.
        let authority = try CertificateAuthority.load(directory: cluster.tlsFolder)
        let expired = JoinToken.create(ttl: 60, authority: authority, now: Date() - 3600)
        var parts = created.token.split(separator: ".").map(String.init)
        let first: String = parts[2].first == "1" ? "2" : "1"
        parts[2] = first + parts[2].dropFirst()
        let forged = parts.joined(separator: ".")
        let foreign = JoinToken.create(ttl: 600, authority: try CertificateAuthority.create())
        for (token, why) in [(expired, "expired at"), (forged, "not signed by this cluster's CA"), (foreign, "is not the one the token names")] {
            try cluster.add(join: cluster.members[contact].api, token: token)
            let i = cluster.members.count - 1
            try cluster.start(i)
            let process = try #require(cluster.members[i].process)
            try await eventually("the joiner with a bad token (\(why)) to exit", timeout: .seconds(30)) { !process.isRunning }
            #expect(process.terminationStatus != 0)
            #expect(cluster.logTail(i, lines: 50).contains(why), "\(cluster.logTail(i, lines: 50))")
            #expect(!FileManager.default.fileExists(atPath: "\(cluster.members[i].tokenTLSFolder)/\(cluster.members[i].folder.hostID).pem"))
        }
        try await eventually("the contact to log both refused tokens with their addresses") {
            cluster.logTail(contact, lines: 5000).split(separator: "\n")
                .filter { $0.contains("refused a join token") && $0.contains("address=") && $0.contains("127.0.0.1") }.count >= 2
        }

        // The cluster served on.
        _ = try await admin.put("/records/app/config", Array("v2".utf8))
        #expect(try await admin.get("/records/app/config").value == "v2")
        try await eventually("the restarted joiner to read the last value", timeout: .seconds(20)) {
            (try? await cluster.client(3).get("/records/app/config"))?.value == "v2"
        }
    }
}

extension SecurityDaemonTests {
    @Test("each client's sessions, watches and open requests are limited, and it is counted as itself through a follower and through a worker that joined with a token; other clients are served meanwhile")
    func perClientLimits() async throws {
        let binary = try #require(circuitBinary(), "the circuit executable was not built next to the tests")
        let cluster = try DaemonProcesses(binary: binary, base: try temporaryFolder("limit-daemons"), count: 3, sessionTTLMillis: loadedMachineTTL)
        try cluster.enableTLS()
        cluster.extraArguments = ["--max-sessions-per-client", "2", "--max-watches-per-client", "2", "--max-streams-per-client", "3"]
        try cluster.startAll()
        defer { cluster.stopAll(signal: SIGKILL) }
        let leader = try await cluster.leader()
        _ = try await cluster.allAlive()
        let follower = (leader + 1) % 3
        let api = cluster.members[follower].api
        var alice = CircuitClient(endpoints: [api], tls: try cluster.issueClient("alice", roles: [.read, .write]))
        alice.timeout = 60
        let bob = CircuitClient(endpoints: [api], tls: try cluster.issueClient("bob", roles: [.read, .write]))

        // Sessions, asked of a follower: the leader counts them as alice's.
        let first = try await alice.grantSession(ttlMillis: 60_000)
        _ = try await alice.grantSession(ttlMillis: 60_000)
        let third = await refusalMessage { _ = try await alice.grantSession(ttlMillis: 60_000) }
        #expect(third?.hasPrefix("too_many_sessions: alice already holds 2 sessions") == true, "\(third ?? "granted")")
        let bobs = try await bob.grantSession(ttlMillis: 60_000)
        // A client ends only its own sessions; an admin may end anyone's.
        let notHis = await refusalMessage { try await bob.revoke(first) }
        #expect(notHis?.contains("session \(first) belongs to alice, not to bob") == true, "\(notHis ?? "ended")")
        try await cluster.live.revoke(bobs)
        try await alice.revoke(first)
        let again = try await alice.grantSession(ttlMillis: 60_000)

        // Watches: two open; a third is refused at once; bob's is served.
        let key = "/records/limits/k"
        let opened = Tally()
        var holders: [Task<Void, Never>] = []
        for _ in 0..<2 {
            let stream = alice.watch(key)
            holders.append(Task {
                var told = false
                do {
                    for try await _ in stream where !told {
                        told = true
                        opened.add()
                    }
                } catch {}
            })
        }
        // Open once each has seen a change (one made before a watch opened is not in it: changes go on until).
        try await eventually("alice's two watches to see a change") {
            _ = try? await bob.put(key, Array("w".utf8))
            return opened.value == 2
        }
        let thirdWatch = await firstOutcome(of: alice.watch(key)) { _ = try await bob.put(key, Array("x".utf8)) }
        #expect(thirdWatch.hasPrefix("too_many_watches: alice already has 2 watches and waits open"), "\(thirdWatch)")
        #expect(await firstOutcome(of: bob.watch(key)) { _ = try await bob.put(key, Array("y".utf8)) } == "event")

        // Streams: with a receive waiting on an empty channel of the follower's host she has 3 open; a 4th request
        // of any kind is refused, bob's are served. The receive given up, she is served again.
        let chan = "/\(cluster.members[follower].folder.hostID)/limits"
        _ = try await alice.makeChannel(chan, capacity: 0)
        let channel = try await alice.channel(chan)
        let receiving = Task { try await channel.receive() }
        try await eventually("alice's fourth request to be refused") {
            (await refusalMessage { _ = try await alice.status() })?.hasPrefix("too_many_streams: alice already has 3") == true
        }
        #expect(try await bob.status().security == "mutual TLS")
        receiving.cancel()
        try await eventually("alice to be served once her receive is given up") { (try? await alice.status()) != nil }

        // A watch given up (the client hangs up) makes room for another.
        holders[0].cancel()
        try await eventually("a new watch of alice's to be served") {
            await firstOutcome(of: alice.watch(key)) { _ = try await bob.put(key, Array("z".utf8)) } == "event"
        }
        holders[1].cancel()

        // A worker that joined with a token relays for its clients as themselves: alice's sessions are still 2.
        let token = try await cluster.live.createToken(ttlSeconds: 600)
        try cluster.add(join: cluster.members[leader].api, as: "worker", token: token.token)
        try cluster.start(3)
        let hosts = try await cluster.allAlive(timeout: .seconds(60))
        let worker = cluster.members[3]
        #expect(hosts.contains { $0.id == worker.folder.hostID && $0.role == "worker" && $0.state == "alive" })
        #expect(try TLSFiles(directory: worker.tokenTLSFolder, name: worker.folder.hostID).grant.roles == [.host])
        try await eventually("the worker serving its API", timeout: .seconds(20)) { (try? await cluster.client(3).status()) != nil }
        let aliceAtWorker = CircuitClient(endpoints: [worker.api], tls: alice.tls)
        let atWorker = await refusalMessage { _ = try await aliceAtWorker.grantSession(ttlMillis: 60_000) }
        #expect(atWorker?.hasPrefix("too_many_sessions: alice already holds 2") == true, "\(atWorker ?? "granted")")
        try await aliceAtWorker.revoke(again)
        _ = try await aliceAtWorker.grantSession(ttlMillis: 60_000)
        _ = try await CircuitClient(endpoints: [worker.api], tls: bob.tls).grantSession(ttlMillis: 60_000)
        #expect(cluster.logTail(follower, lines: 2000).contains("refused a request past a per-client limit"))
    }
}

/// A count several tasks add to.
private final class Tally: Sendable {
    private let count = Atomic(0)
    func add() { count.add(1, ordering: .relaxed) }
    var value: Int { count.load(ordering: .relaxed) }
}

/// How a watch begins: "event" at its first event, or the error it ends with ("code: message"). `trigger` makes a
/// change, again every 100 ms until the watch has seen one (a change made before the watch opened is not in it).
private func firstOutcome(
    of stream: AsyncThrowingStream<EventView, any Error>, trigger: @escaping @Sendable () async throws -> Void
) async -> String {
    let triggering = Task {
        while !Task.isCancelled {
            try? await trigger()
            try? await Task.sleep(for: .milliseconds(100))
        }
    }
    defer { triggering.cancel() }
    do {
        return try await withDeadline("a watch's first event or error") {
            for try await _ in stream { return "event" }
            return "ended"
        }
    } catch {
        if case .api(let e)? = error as? CircuitClientError { return "\(e.code): \(e.message)" }
        return "\(error)"
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
