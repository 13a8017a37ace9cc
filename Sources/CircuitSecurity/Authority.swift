import Crypto
import Foundation
import SwiftASN1
import X509

/// The cluster's certificate authority: a P-256 key and a self-signed certificate that every member and client
/// trusts, and that signs their certificates (`circuit ca init`, `circuit ca issue`).
public struct CertificateAuthority: Sendable {
    public let certificate: Certificate
    private let key: P256.Signing.PrivateKey

    /// The file names in a CA folder.
    public static let certificateFile = "ca.pem"
    public static let keyFile = "ca.key"

    /// A new authority, valid for `days`.
    public static func create(name: String = "circuit cluster CA", days: Int = 3650) throws -> CertificateAuthority {
        let key = P256.Signing.PrivateKey()
        let subject = try DistinguishedName {
            OrganizationName("circuit")
            CommonName(name)
        }
        let now = Date()
        let certificate = try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: .init(key.publicKey),
            notValidBefore: now - 3600, notValidAfter: now + Double(days) * 86400, issuer: subject, subject: subject,
            signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: 0))
                Critical(KeyUsage(keyCertSign: true, cRLSign: true))
                SubjectKeyIdentifier(hash: Certificate.PublicKey(key.publicKey))
            },
            issuerPrivateKey: .init(key))
        return CertificateAuthority(certificate: certificate, key: key)
    }

    private init(certificate: Certificate, key: P256.Signing.PrivateKey) {
        self.certificate = certificate
        self.key = key
    }

    /// Reads `ca.pem` and `ca.key` from `directory`.
    public static func load(directory: String) throws -> CertificateAuthority {
        do {
            return try read(certificate: directory + "/" + certificateFile, key: directory + "/" + keyFile)
        } catch let error as SecurityError {
            throw error
        } catch {
            throw SecurityError.io("cannot read the CA in \(directory) (\(certificateFile), \(keyFile)): \(error)")
        }
    }

    /// Reads the CA's certificate and key from two files (a member's `tls-ca` and `tls-ca-key`).
    public static func load(certificate certificatePath: String, key keyPath: String) throws -> CertificateAuthority {
        do {
            return try read(certificate: certificatePath, key: keyPath)
        } catch let error as SecurityError {
            throw error
        } catch {
            throw SecurityError.io("cannot read the CA from \(certificatePath) and its key \(keyPath): \(error)")
        }
    }

    private static func read(certificate certificatePath: String, key keyPath: String) throws -> CertificateAuthority {
        let certificate = try Certificate(pemEncoded: try String(contentsOfFile: certificatePath, encoding: .utf8))
        let key = try P256.Signing.PrivateKey(pemRepresentation: try String(contentsOfFile: keyPath, encoding: .utf8))
        guard Certificate.PublicKey(key.publicKey) == certificate.publicKey else {
            throw SecurityError.invalid("\(keyPath) is not the key of \(certificatePath)")
        }
        return CertificateAuthority(certificate: certificate, key: key)
    }

    /// Writes `ca.pem` (0644) and `ca.key` (0600) into `directory`, which is created (0700) if missing. An existing
    /// CA there is never overwritten: every certificate it signed would stop being trusted.
    public func write(to directory: String) throws {
        try FileManager.default.createDirectory(
            atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        for name in [Self.certificateFile, Self.keyFile] where FileManager.default.fileExists(atPath: directory + "/" + name) {
            throw SecurityError.invalid("\(directory)/\(name) exists: refusing to replace a cluster's CA")
        }
        try PEMFiles.write(key.pemRepresentation, to: directory + "/" + Self.keyFile, mode: 0o600)
        try PEMFiles.write(try certificate.serializeAsPEM().pemString, to: directory + "/" + Self.certificateFile, mode: 0o644)
    }

    public var certificatePEM: String { (try? certificate.serializeAsPEM().pemString) ?? "" }

    /// The SHA-256 of the CA certificate's DER, in lowercase hex: what a join token names, so that a joining host can
    /// pin the CA before it trusts anything it is sent.
    public var certificateDigest: String {
        Self.digest(ofDER: (try? certificate.serializeAsPEM().derBytes) ?? [])
    }

    /// The SHA-256 of a certificate's DER bytes, in lowercase hex.
    public static func digest(ofDER der: [UInt8]) -> String { Hex.encode(SHA256.hash(data: der)) }

    /// The key join tokens are signed with (HMAC-SHA256): derived from the CA's private key, so that only a holder
    /// of that key can make or check a token, and nothing needs storing. The private key itself never leaves.
    var tokenKey: SymmetricKey {
        var hash = SHA256()
        hash.update(data: Data("circuit join tokens".utf8))
        hash.update(data: key.rawRepresentation)
        return SymmetricKey(data: hash.finalize())
    }

    /// Signs a new key's certificate for `name` (a host id `X…` for a member, any name for a client) carrying
    /// `roles`, valid for `days`. `addresses` (IP addresses or DNS names) go in the subject alternative names, for
    /// tools that check them; Circuit itself trusts the CA and checks the name and roles.
    public func issue(name: String, roles: Set<AccessRole>, addresses: [String] = [], days: Int = 365) throws -> IssuedCertificate {
        let leafKey = P256.Signing.PrivateKey()
        let leafPEM = try issue(
            name: name, roles: roles, publicKey: Certificate.PublicKey(leafKey.publicKey), addresses: addresses, days: days)
        return IssuedCertificate(certificatePEM: leafPEM, keyPEM: leafKey.pemRepresentation, caPEM: certificatePEM)
    }

    /// Signs a certificate for a key held elsewhere (a joining host's, from its certificate request: its private key
    /// never travels), as `issue(name:roles:addresses:days:)` does; answers the certificate's PEM.
    public func issue(
        name: String, roles: Set<AccessRole>, publicKey: Certificate.PublicKey, addresses: [String] = [], days: Int = 365
    ) throws -> String {
        guard !name.isEmpty, name.count <= 64, !name.contains(where: { $0.isNewline || $0 == "," || $0 == "/" }) else {
            throw SecurityError.invalid("certificate name \(name.debugDescription) must be 1 to 64 characters, without ',', '/' or newlines")
        }
        guard !roles.isEmpty else { throw SecurityError.invalid("a certificate needs at least one role") }
        let subject = try DistinguishedName {
            OrganizationName("circuit")
            for role in roles.sorted() { OrganizationalUnitName(role.rawValue) }
            CommonName(name)
        }
        let now = Date()
        let sans: [GeneralName] = addresses.map { address in
            if let bytes = Self.ipv4(address) { return .ipAddress(ASN1OctetString(contentBytes: bytes[...])) }
            return .dnsName(address)
        }
        let certificate = try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: publicKey,
            notValidBefore: now - 3600, notValidAfter: now + Double(days) * 86400, issuer: self.certificate.subject,
            subject: subject, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                try ExtendedKeyUsage([.serverAuth, .clientAuth])
                if !sans.isEmpty { SubjectAlternativeNames(sans) }
            },
            issuerPrivateKey: .init(key))
        return try certificate.serializeAsPEM().pemString
    }

    /// Signs the certificate a verified request asks for (its common name, its key) with `roles`.
    public func issue(_ request: CertificateRequest, roles: Set<AccessRole>, days: Int = 365) throws -> String {
        try issue(name: request.commonName, roles: roles, publicKey: request.publicKey, days: days)
    }

    private static func ipv4(_ s: String) -> [UInt8]? {
        let parts = s.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        let bytes = parts.compactMap { UInt8($0) }
        return bytes.count == 4 ? bytes : nil
    }
}

/// A certificate and its new key, with the CA that signed it.
public struct IssuedCertificate: Sendable {
    public let certificatePEM: String
    public let keyPEM: String
    public let caPEM: String

    public init(certificatePEM: String, keyPEM: String, caPEM: String) {
        self.certificatePEM = certificatePEM
        self.keyPEM = keyPEM
        self.caPEM = caPEM
    }

    /// Writes `<prefix>.pem` (0644), `<prefix>.key` (0600) and `ca.pem` beside them; each file is replaced
    /// atomically, so a daemon re-reading its files (rotation) sees the old set or the new one.
    public func write(directory: String, name: String) throws -> (certificate: String, key: String, ca: String) {
        try FileManager.default.createDirectory(
            atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        let paths = (directory + "/" + name + ".pem", directory + "/" + name + ".key", directory + "/" + CertificateAuthority.certificateFile)
        try PEMFiles.write(keyPEM, to: paths.1, mode: 0o600)
        try PEMFiles.write(certificatePEM, to: paths.0, mode: 0o644)
        try PEMFiles.write(caPEM, to: paths.2, mode: 0o644)
        return paths
    }
}

enum PEMFiles {
    /// Writes through a temporary file created with `mode` (a key is never readable by others, not even for a
    /// moment), fsyncs it, and renames it over `path`.
    static func write(_ text: String, to path: String, mode: mode_t) throws {
        let temporary = path + ".tmp-\(getpid())"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode)
        guard fd >= 0 else { throw SecurityError.io("cannot create \(temporary): \(String(cString: strerror(errno)))") }
        let bytes = Array(text.utf8)
        var written = 0
        while written < bytes.count {
            let n = bytes[written...].withUnsafeBytes { Foundation.write(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                close(fd)
                unlink(temporary)
                throw SecurityError.io("cannot write \(temporary): \(String(cString: strerror(errno)))")
            }
            written += n
        }
        fchmod(fd, mode)  // open's mode is filtered by the umask
        fsync(fd)
        close(fd)
        guard rename(temporary, path) == 0 else {
            unlink(temporary)
            throw SecurityError.io("cannot rename \(temporary) to \(path): \(String(cString: strerror(errno)))")
        }
    }
}
