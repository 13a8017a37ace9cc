import CircuitAPI
import CircuitClient
import CircuitSecurity
import CircuitStateMachine
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import NIOHTTP1
import NIOSSL

/// The API's side of join tokens (README "Security"): a member holding the CA's key (`tls-ca-key`) creates tokens
/// for admins, and issues a `host` certificate to whoever presents a valid one with a certificate request.
///
/// - `POST /v1/tokens?ttl=SECONDS` (admin): a new token (`JoinToken`).
/// - `GET /v1/join/ca` (no certificate needed): this member's CA certificate file, which a joining host checks
///   against the digest its token names before trusting it.
/// - `POST /v1/join/certificate` (no certificate needed): `{"token", "csr"}` → `{"certificate", "ca"}`. A wrong or
///   expired token is a 403 `bad_token` naming why, and is logged with the caller's address.
///
/// Tokens are stateless (an HMAC under a key derived from the CA key), so any member holding the key serves them,
/// leader or not, and nothing goes through Raft. A member without the key answers 503 `no_ca_key`.
struct JoinRoutes: Sendable {
    let node: NodeContext

    func add(to router: Router<APIContext>) {
        router.post("/v1/tokens") { request, _ in try createToken(request) }
        router.get("/v1/join/ca") { _, _ in try caCertificate() }
        router.post("/v1/join/certificate") { request, context in try await issueCertificate(request, context) }
    }

    private func createToken(_ request: Request) throws -> Response {
        let authority = try requireAuthority(to: "create join tokens")
        var ttl = 3600
        if let raw = request.uri.queryParameters.get("ttl") {
            guard let seconds = Int(raw), JoinToken.ttlRange.contains(seconds) else {
                throw APIError.badRequest("ttl=\(raw): a join token lives 1 to \(JoinToken.ttlRange.upperBound) seconds (7 days)")
            }
            ttl = seconds
        }
        let text = JoinToken.create(ttl: ttl, authority: authority)
        let expires = (try? JoinToken.parse(text))?.expires ?? 0
        node.logger.notice("created a join token", metadata: ["ttl_s": "\(ttl)", "expires": "\(expires)"])
        return try json(TokenView(token: text, expires: expires))
    }

    private func caCertificate() throws -> Response {
        guard let tls = node.transport.configuration.tls else { throw Self.noTLS }
        let pem: String
        do { pem = try String(contentsOfFile: tls.caPath, encoding: .utf8) } catch {
            throw APIError(status: 500, code: "internal", message: "cannot read this member's CA certificate \(tls.caPath): \(error)")
        }
        return Response(
            status: .ok, headers: [.contentType: "application/x-pem-file"], body: .init(byteBuffer: ByteBuffer(string: pem)))
    }

    private func issueCertificate(_ request: Request, _ context: APIContext) async throws -> Response {
        guard node.transport.configuration.tls != nil else { throw Self.noTLS }
        let authority = try requireAuthority(to: "issue certificates to joining hosts")
        let address = context.channel.remoteAddress.map { "\($0)" } ?? "unknown"
        var request = request
        let body = try await request.collectBody(upTo: HTTPAPI.maxBody)
        let asked: JoinCertificateRequestView
        if let problem = JSONLimits.depthProblem(body.readableBytesView) { throw APIError.badRequest("the body: \(problem)") }
        do { asked = try JSONDecoder().decode(JoinCertificateRequestView.self, from: Data(buffer: body)) } catch {
            throw APIError.badRequest("the body is not {\"token\": TOKEN, \"csr\": PEM of a PKCS#10 request}: \(error)")
        }
        do {
            try JoinToken.verify(asked.token, authority: authority)
        } catch {
            node.logger.warning("refused a join token", metadata: ["address": "\(address)", "why": "\(error)"])
            throw APIError(status: 403, code: "bad_token", message: "\(error)")
        }
        let csr: CertificateRequest
        do { csr = try CertificateRequest(pem: asked.csr) } catch {
            throw APIError(status: 400, code: "bad_csr", message: "\(error)")
        }
        guard HostID.isValid(csr.commonName) else {
            throw APIError(
                status: 400, code: "bad_csr",
                message: "the request's common name \(csr.commonName.debugDescription) is not a host id (X and 16 lowercase hex "
                    + "digits): a join token gets a member's certificate, named for its host id")
        }
        // A token's holder could otherwise take the name (and so the peer-port identity) of a member that is up.
        let alive = node.service.state.read { $0.hosts[csr.commonName]?.state == .alive }
        guard !alive else {
            throw APIError(
                status: 409, code: "host_alive",
                message: "\(csr.commonName) is alive in the cluster: a join token does not issue a certificate in a live member's name")
        }
        let certificate = try authority.issue(csr, roles: [.host])
        node.logger.notice(
            "issued a host certificate for a join token", metadata: ["host": "\(csr.commonName)", "address": "\(address)"])
        return try json(JoinCertificateView(certificate: certificate, ca: authority.certificatePEM))
    }

    private func requireAuthority(to what: String) throws -> CertificateAuthority {
        guard let authority = node.authority else {
            throw APIError(
                status: 503, code: "no_ca_key",
                message: "this member (\(node.folder.hostID)) holds no CA key, so it cannot \(what): ask a member started with --tls-ca-key")
        }
        return authority
    }

    private static let noTLS = APIError(
        status: 409, code: "no_tls", message: "this cluster speaks no TLS: there is no CA to join with, and a joining host needs no certificate")
}

/// Why a host could not get its certificate with a join token.
struct TokenJoinError: Error, CustomStringConvertible {
    let description: String
}

/// The joining host's side of a join with a token, before the join itself (`CircuitDaemon.tlsFromDirectory`):
///
/// 1. `GET /v1/join/ca` from the contact over TLS without verifying it (there is nothing to verify it with yet);
/// 2. the CA certificate is used only if its SHA-256 is the one the token names: a server in between cannot put
///    its own CA in;
/// 3. a new P-256 key and a certificate request for this host id go to `POST /v1/join/certificate` with the token,
///    over TLS now verifying the contact against that CA;
/// 4. the CA, the certificate and the key (0600) are written to `directory` as `ca.pem`, `<host id>.pem` and
///    `<host id>.key`, where the daemon then finds them, now and at every later start.
///
/// The key never leaves the host. A contact that cannot be reached yet is asked again for up to 30 s; a refusal
/// (a wrong or expired token) is final and names the contact's reason.
struct TokenJoin {
    let contact: String
    let token: String
    let directory: String
    let hostID: String
    let logger: Logger

    func run() async throws {
        let parsed: JoinToken
        do { parsed = try JoinToken.parse(token) } catch { throw TokenJoinError(description: "--token: \(error)") }
        let unverified = try JoinTLS.unverified()
        let offered = try await exchange(.GET, "/v1/join/ca", body: nil, context: unverified, what: "give its CA certificate")
        guard let ca = parsed.pinnedCA(in: String(decoding: offered, as: UTF8.self)) else {
            throw TokenJoinError(
                description: "the CA at \(contact) is not the one the token names (SHA-256 \(parsed.caDigest.prefix(16))…): "
                    + "refusing to trust it. Is the token for this cluster?")
        }
        logger.info("join: the contact's CA is the one the token names", metadata: ["contact": "\(contact)"])
        let request = try CertificateRequest.make(commonName: hostID)
        let body = try JSONEncoder().encode(JoinCertificateRequestView(token: token, csr: request.request))
        let pinned = try JoinTLS.trusting(caPEM: ca)
        let answer = try await exchange(
            .POST, "/v1/join/certificate", body: Array(body), context: pinned, what: "issue this host's certificate")
        let issued: JoinCertificateView
        do { issued = try JSONDecoder().decode(JoinCertificateView.self, from: Data(answer)) } catch {
            throw TokenJoinError(description: "\(contact) answered the certificate request with something unreadable: \(error)")
        }
        // The CA written is the one pinned by the token, whatever else the answer says.
        let paths = try IssuedCertificate(certificatePEM: issued.certificate, keyPEM: request.keyPEM, caPEM: ca)
            .write(directory: directory, name: hostID)
        logger.notice(
            "join: the cluster issued this host's certificate for the join token",
            metadata: ["certificate": "\(paths.certificate)", "key": "\(paths.key)", "ca": "\(paths.ca)"])
    }

    /// One request to the contact with `context` (no client certificate); answers a 200's body.
    private func exchange(
        _ method: NIOHTTP1.HTTPMethod, _ uri: String, body: [UInt8]?, context: NIOSSLContext, what: String
    ) async throws -> [UInt8] {
        let deadline = ContinuousClock.now + .seconds(30)
        while true {
            let answer: HTTPExchange.Answer
            do {
                answer = try await HTTPExchange.perform(method, uri, to: contact, body: body, tls: nil, sslContext: context)
            } catch let error as HTTPExchangeError where error.requestNotSent {
                // Not sent (the contact may be starting): asked again.
                guard ContinuousClock.now < deadline else {
                    throw TokenJoinError(description: "cannot reach \(contact) to \(what) within 30 s: \(error)")
                }
                logger.info("join: retrying", metadata: ["step": "\(uri)", "error": "\(error)"])
                try await Task.sleep(for: .milliseconds(200))
                continue
            } catch {
                throw TokenJoinError(description: "\(contact) did not \(what): \(error)")
            }
            guard answer.status == 200 else {
                let why = (try? JSONDecoder().decode(ErrorEnvelope.self, from: Data(answer.body)))
                    .map { "\($0.error.code): \($0.error.message)" } ?? "HTTP \(answer.status)"
                throw TokenJoinError(description: "\(contact) refused to \(what): \(why)")
            }
            return answer.body
        }
    }
}
