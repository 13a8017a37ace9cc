import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOSSL
import NIOTLS
import X509

/// One party's TLS identity from three PEM files: the cluster's CA, its certificate and its key. It makes the
/// TLS contexts for both ends of a connection, mutual in both directions: a server asks for the peer's
/// certificate and refuses a peer without one signed by the CA. The API's server context alone lets a client
/// without a certificate through the handshake (one of another CA is still refused), for the two calls of the join
/// exchange that a host with a join token and no certificate yet makes; every other call then answers 401.
///
/// Rotation: the files are looked at again (their size, inode and modification time) at most once a second when a
/// context is asked for, and on `reload()` (the daemon calls it on SIGHUP). New connections then use the new files;
/// established ones keep theirs. A half-written set (a certificate that does not match its key) keeps the
/// previous contexts and is reported by `reload()`.
public final class TLSFiles: Sendable {
    public let caPath: String
    public let certificatePath: String
    public let keyPath: String

    private struct Loaded {
        var stamp: [FileStamp]
        var checked: ContinuousClock.Instant
        var server: NIOSSLContext
        var apiServer: NIOSSLContext
        var client: NIOSSLContext
        var grant: Grant
    }

    private let loaded: NIOLockedValueBox<Loaded>

    /// Loads the files; an unreadable or mismatched set is an error naming the file.
    public init(ca: String, certificate: String, key: String) throws {
        caPath = ca
        certificatePath = certificate
        keyPath = key
        loaded = NIOLockedValueBox(try Self.load(ca: ca, certificate: certificate, key: key))
    }

    /// The identity in `directory` named `name`: `<name>.pem`, `<name>.key` and `ca.pem` (as `circuit ca issue` writes them).
    public convenience init(directory: String, name: String) throws {
        try self.init(ca: directory + "/" + CertificateAuthority.certificateFile, certificate: directory + "/" + name + ".pem",
                      key: directory + "/" + name + ".key")
    }

    /// Who this identity is: its certificate's name and roles.
    public var grant: Grant { current().grant }

    /// For accepting connections on the peer port: a client certificate of the CA is required.
    public func serverContext() -> NIOSSLContext { current().server }

    /// For accepting connections on the API: a client certificate is asked for and, if presented, must be the CA's;
    /// a client may present none (a joining host), and the API then serves it only the join exchange.
    public func apiServerContext() -> NIOSSLContext { current().apiServer }

    /// For dialing (peers, the API as a client).
    public func clientContext() -> NIOSSLContext { current().client }

    /// Reads the files again now (SIGHUP); on an error the previous contexts stay in use.
    @discardableResult
    public func reload() throws -> Grant {
        let fresh = try Self.load(ca: caPath, certificate: certificatePath, key: keyPath)
        loaded.withLockedValue { $0 = fresh }
        return fresh.grant
    }

    private func current() -> Loaded {
        let now = ContinuousClock.now
        let stale: [FileStamp]? = loaded.withLockedValue { l in
            guard now - l.checked >= .seconds(1) else { return nil }
            l.checked = now
            return l.stamp
        }
        if let stale, stale != Self.stamps([caPath, certificatePath, keyPath]) { _ = try? reload() }
        return loaded.withLockedValue { $0 }
    }

    private static func load(ca: String, certificate: String, key: String) throws -> Loaded {
        let stamp = stamps([ca, certificate, key])
        let roots: [NIOSSLCertificate]
        let chain: [NIOSSLCertificate]
        let privateKey: NIOSSLPrivateKey
        do { roots = try NIOSSLCertificate.fromPEMFile(ca) } catch { throw SecurityError.io("cannot read the CA certificate \(ca): \(error)") }
        do { chain = try NIOSSLCertificate.fromPEMFile(certificate) } catch { throw SecurityError.io("cannot read the certificate \(certificate): \(error)") }
        do { privateKey = try NIOSSLPrivateKey(file: key, format: .pem) } catch { throw SecurityError.io("cannot read the key \(key): \(error)") }
        guard let leaf = chain.first, !roots.isEmpty else { throw SecurityError.invalid("\(certificate) or \(ca) holds no certificate") }
        let grant = try Self.grant(of: leaf)

        var server = TLSConfiguration.makeServerConfiguration(
            certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(privateKey))
        server.trustRoots = .certificates(roots)
        // Names are not checked against addresses: the cluster's own CA is the only root trusted, and the caller
        // checks the name and roles the certificate carries (a member's host id, a client's role).
        server.certificateVerification = .noHostnameVerification
        server.minimumTLSVersion = .tlsv13
        var apiServer = server
        apiServer.certificateVerification = .optionalVerification
        var client = TLSConfiguration.makeClientConfiguration()
        client.certificateChain = chain.map { .certificate($0) }
        client.privateKey = .privateKey(privateKey)
        client.trustRoots = .certificates(roots)
        client.certificateVerification = .noHostnameVerification
        client.minimumTLSVersion = .tlsv13
        do {
            return Loaded(
                stamp: stamp, checked: .now, server: try NIOSSLContext(configuration: server),
                apiServer: try NIOSSLContext(configuration: apiServer), client: try NIOSSLContext(configuration: client),
                grant: grant)
        } catch {
            throw SecurityError.invalid("\(certificate) and \(key) do not make a TLS identity (is the key the certificate's?): \(error)")
        }
    }

    /// The name and roles a certificate carries: its subject's common name and organizational units.
    public static func grant(of certificate: NIOSSLCertificate) throws -> Grant {
        let parsed: Certificate
        do { parsed = try Certificate(derEncoded: try certificate.toDERBytes()) } catch {
            throw SecurityError.invalid("unreadable certificate: \(error)")
        }
        var name = ""
        var roles: Set<AccessRole> = []
        for rdn in parsed.subject {
            for attribute in rdn {
                guard let value = String(attribute.value) else { continue }
                if attribute.type == .RDNAttributeType.commonName { name = value }
                if attribute.type == .RDNAttributeType.organizationalUnitName, let role = AccessRole(rawValue: value) { roles.insert(role) }
            }
        }
        return Grant(name: name, roles: roles)
    }

    private static func stamps(_ paths: [String]) -> [FileStamp] {
        paths.map { path in
            var s = stat()
            guard stat(path, &s) == 0 else { return FileStamp() }
            return FileStamp(inode: UInt64(s.st_ino), size: Int64(s.st_size), seconds: Int64(s.st_mtim.tv_sec), nanos: Int64(s.st_mtim.tv_nsec))
        }
    }
}

struct FileStamp: Equatable, Sendable {
    var inode: UInt64 = 0
    var size: Int64 = -1
    var seconds: Int64 = 0
    var nanos: Int64 = 0
}

extension NIOSSLHandler {
    /// The grant of the certificate the peer presented on this connection (nil before the handshake).
    public var peerGrant: Grant? {
        peerCertificate.flatMap { try? TLSFiles.grant(of: $0) }
    }
}

/// Logs a TLS handshake that failed (a peer without a certificate, or with one of another CA) with the peer's
/// address, then passes the error on (the connection closes). Errors after the handshake (a client that hangs up
/// without a TLS close) are not refusals and are not logged.
public final class TLSRefusalLogger: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = NIOAny
    private let logger: Logger
    private let what: String
    private var settled = false

    public init(logger: Logger, what: String) {
        self.logger = logger
        self.what = what
    }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event { settled = true }
        context.fireUserInboundEventTriggered(event)
    }

    public func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if !settled {
            settled = true
            logger.warning(
                "refused a TLS connection",
                metadata: ["port": "\(what)", "address": "\(context.remoteAddress.map { "\($0)" } ?? "?")", "error": "\(error)"])
        }
        context.fireErrorCaught(error)
    }
}
