import Crypto
import Foundation
import NIOSSL
import SwiftASN1
import X509

/// A join token: what lets a new host get its certificate from the cluster in the join exchange, for a short time
/// (`circuit token create --ttl`), without anyone issuing the certificate beforehand. Like kubeadm's bootstrap
/// tokens it is stateless: nothing is stored or replicated; a member holding the CA's key recomputes the MAC.
///
/// The text is four parts joined by dots:
///
///     <expiry, unix seconds>.<16 random bytes, hex>.<HMAC-SHA256, hex>.<SHA-256 of the CA certificate's DER, hex>
///
/// The MAC covers the expiry, the random part and the CA digest, keyed with a key derived from the CA's private key
/// (`CertificateAuthority.tokenKey`), so only a holder of that key can make or check one. The last part lets the
/// joining host pin the CA before it trusts anything: it fetches the CA certificate without verifying the server,
/// and uses it only if its digest is the one the token names.
///
/// Whoever holds a token can get a `host` certificate until it expires: hand it over as a secret and keep its life
/// short. The text is not this type's description, so that logging a token's fields does not log the token.
public struct JoinToken: Sendable, Equatable {
    /// When it stops being accepted, in seconds since 1970.
    public let expires: Int64
    public let random: [UInt8]
    public let mac: [UInt8]
    /// The SHA-256 of the DER of the CA certificate that the token's holder is to trust, lowercase hex.
    public let caDigest: String

    /// How long a token may live, in seconds: a second to 7 days.
    public static let ttlRange: ClosedRange<Int> = 1...(7 * 86400)

    /// The token's text, as `circuit token create` prints it.
    public var text: String { "\(expires).\(Hex.encode(random)).\(Hex.encode(mac)).\(caDigest)" }

    /// What the MAC covers.
    private var signedText: String { "circuit-join-token|\(expires)|\(Hex.encode(random))|\(caDigest)" }

    /// A new token for `authority`'s cluster, accepted for `ttl` seconds from `now`.
    public static func create(ttl: Int, authority: CertificateAuthority, now: Date = Date()) -> String {
        let expires = Int64(now.timeIntervalSince1970.rounded(.down)) + Int64(ttl)
        var generator = SystemRandomNumberGenerator()  // the kernel's CSPRNG (getrandom)
        let random = (0..<16).map { _ in UInt8.random(in: .min ... .max, using: &generator) }
        let unsigned = JoinToken(expires: expires, random: random, mac: [], caDigest: authority.certificateDigest)
        let mac = HMAC<SHA256>.authenticationCode(for: Data(unsigned.signedText.utf8), using: authority.tokenKey)
        return JoinToken(expires: expires, random: random, mac: Array(mac), caDigest: unsigned.caDigest).text
    }

    /// Reads a token's parts without checking its MAC (the joining host, which holds no CA key, needs the CA
    /// digest). Only the canonical text is accepted: lowercase hex, the expiry without sign or leading zeros, so
    /// that no two texts are one token. An error says what is malformed.
    public static func parse(_ text: String) throws(SecurityError) -> JoinToken {
        func malformed(_ why: String) -> SecurityError { .invalid("the join token is malformed: \(why)") }
        let parts = text.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else {
            throw malformed("it has \(parts.count) part\(parts.count == 1 ? "" : "s") where 4 are expected (expiry.random.mac.ca)")
        }
        guard parts[0].allSatisfy({ $0.isASCII && $0.isNumber }), let expires = Int64(parts[0]), expires > 0,
            String(expires) == parts[0]
        else {
            throw malformed("its expiry \(String(parts[0].prefix(24)).debugDescription) is not a time in unix seconds")
        }
        guard let random = Hex.decode(parts[1]), random.count == 16 else {
            throw malformed("its second part is not 32 lowercase hex digits")
        }
        guard let mac = Hex.decode(parts[2]), mac.count == 32 else {
            throw malformed("its third part (the MAC) is not 64 lowercase hex digits")
        }
        guard let ca = Hex.decode(parts[3]), ca.count == 32 else {
            throw malformed("its fourth part (the CA's SHA-256) is not 64 lowercase hex digits")
        }
        return JoinToken(expires: expires, random: random, mac: mac, caDigest: Hex.encode(ca))
    }

    /// Checks `text` on a member holding the CA's key: well formed, naming this cluster's CA, its MAC made with this
    /// CA's key, and not expired at `now`. The error names what was wrong.
    @discardableResult
    public static func verify(_ text: String, authority: CertificateAuthority, now: Date = Date()) throws(SecurityError) -> JoinToken {
        let token = try parse(text)
        let ours = authority.certificateDigest
        guard token.caDigest == ours else {
            throw .invalid(
                "the join token is not signed by this cluster's CA: it names the CA with SHA-256 \(token.caDigest.prefix(16))…, "
                    + "this cluster's is \(ours.prefix(16))…")
        }
        guard HMAC<SHA256>.isValidAuthenticationCode(token.mac, authenticating: Data(token.signedText.utf8), using: authority.tokenKey)
        else {
            throw .invalid("the join token is not signed by this cluster's CA: its MAC does not match (it was altered, or made with another key)")
        }
        let seconds = Int64(now.timeIntervalSince1970.rounded(.down))
        guard seconds < token.expires else {
            let formatter = ISO8601DateFormatter()
            let when = formatter.string(from: Date(timeIntervalSince1970: TimeInterval(token.expires)))
            throw .invalid("the join token expired at \(when) (\(seconds - token.expires) s ago): create a new one with `circuit token create`")
        }
        return token
    }

    /// The certificate among `pem` (what a member's `GET /v1/join/ca` answered: one or more PEM certificates) whose
    /// DER has the digest this token names, as PEM; nil if there is none.
    public func pinnedCA(in pem: String) -> String? {
        guard let documents = try? PEMDocument.parseMultiple(pemString: pem) else { return nil }
        return documents.first {
            $0.discriminator == Certificate.defaultPEMDiscriminator && CertificateAuthority.digest(ofDER: $0.derBytes) == caDigest
        }?.pemString
    }
}

/// A PKCS#10 certificate signing request: how a joining host asks for its certificate without its private key
/// leaving the host. The CA signs the request's public key under the request's common name.
public struct CertificateRequest: Sendable {
    /// The name asked for (a joining host's id).
    public let commonName: String
    let publicKey: Certificate.PublicKey

    /// Reads a request from PEM and checks its signature (proof that the sender holds the key it names).
    public init(pem: String) throws(SecurityError) {
        let request: CertificateSigningRequest
        do { request = try CertificateSigningRequest(pemEncoded: pem) } catch {
            throw .invalid("the certificate request is not a PEM-encoded PKCS#10 request: \(error)")
        }
        guard request.publicKey.isValidSignature(request.signature, for: request) else {
            throw .invalid("the certificate request's signature does not match the key it names")
        }
        var name = ""
        for rdn in request.subject {
            for attribute in rdn where attribute.type == .RDNAttributeType.commonName {
                if let value = String(attribute.value) { name = value }
            }
        }
        guard !name.isEmpty else { throw .invalid("the certificate request names no common name") }
        commonName = name
        publicKey = request.publicKey
    }

    /// A new P-256 key and a request for `commonName` signed with it: the request's PEM (to send) and the key's PEM
    /// (to keep, mode 0600).
    public static func make(commonName: String) throws -> (request: String, keyPEM: String) {
        let key = P256.Signing.PrivateKey()
        let subject = try DistinguishedName { CommonName(commonName) }
        let request = try CertificateSigningRequest(
            version: .v1, subject: subject, privateKey: Certificate.PrivateKey(key), attributes: CertificateSigningRequest.Attributes(),
            signatureAlgorithm: .ecdsaWithSHA256)
        return (try request.serializeAsPEM().pemString, key.pemRepresentation)
    }
}

/// The TLS contexts of a joining host, which has no certificate yet: it presents none (the API asks for a client
/// certificate but does not require one; the two join calls are open to callers without one).
public enum JoinTLS {
    /// For fetching the CA certificate before any is trusted: TLS 1.3 without verifying the server. What comes back
    /// is used only once its digest matches the join token's (`JoinToken.pinnedCA(in:)`).
    public static func unverified() throws -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.certificateVerification = .none
        configuration.minimumTLSVersion = .tlsv13
        return try NIOSSLContext(configuration: configuration)
    }

    /// Trusting only the CA in `caPEM`, without checking names against addresses (as between members: the cluster's
    /// own CA is the only root).
    public static func trusting(caPEM: String) throws -> NIOSSLContext {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMBytes(Array(caPEM.utf8)))
        configuration.certificateVerification = .noHostnameVerification
        configuration.minimumTLSVersion = .tlsv13
        return try NIOSSLContext(configuration: configuration)
    }
}

/// Lowercase hexadecimal.
enum Hex {
    private static let digits = Array("0123456789abcdef".utf8)

    static func encode(_ bytes: some Sequence<UInt8>) -> String {
        var out: [UInt8] = []
        for byte in bytes {
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 0x0f)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// nil unless `text` is an even number of lowercase hex digits.
    static func decode(_ text: Substring) -> [UInt8]? {
        let utf8 = Array(text.utf8)
        guard utf8.count % 2 == 0 else { return nil }
        func value(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
            default: return nil
            }
        }
        var out: [UInt8] = []
        out.reserveCapacity(utf8.count / 2)
        var i = 0
        while i < utf8.count {
            guard let high = value(utf8[i]), let low = value(utf8[i + 1]) else { return nil }
            out.append(high << 4 | low)
            i += 2
        }
        return out
    }
}
