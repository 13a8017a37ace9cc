import ArgumentParser
import CircuitClient
import CircuitNode
import CircuitSecurity
import Foundation

/// `circuit ca`: the cluster's certificate authority.
struct CA: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ca", abstract: "Create the cluster's certificate authority and issue certificates.",
        discussion: """
            Mutual TLS: every member and client holds a certificate signed by the cluster's CA. A member's \
            certificate is named for its host id and carries the host role; a client's carries the roles it may use: \
            read (status, ls, peek, get, watch, wait), write (records, sessions, channels, selects), exec (processes \
            and jobs), admin (membership, leadership, debugging; implies the others).
            """,
        subcommands: [CAInit.self, CAIssue.self])
}

struct CAInit: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init", abstract: "Create a CA: DIR/ca.pem (the certificate) and DIR/ca.key (mode 0600).")
    @Option(help: "The folder to write to (created with mode 0700).") var dir: String
    @Option(help: "Days the CA is valid.") var days = 3650

    func run() throws {
        let ca = try CertificateAuthority.create(days: days)
        try ca.write(to: dir)
        print("created the cluster CA in \(dir): \(CertificateAuthority.certificateFile), \(CertificateAuthority.keyFile) (keep the key secret)")
    }
}

struct CAIssue: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "issue",
        abstract: "Issue a certificate: for a member (--host X<id>, the host role) or a client (--client NAME --role ...).",
        discussion: """
            Writes NAME.pem, NAME.key (mode 0600) and ca.pem into --out (default: the CA folder). Files are replaced \
            atomically: a daemon takes a rotated certificate up for new connections (at once on SIGHUP).
            """)
    @Option(help: "The CA's folder (ca.pem, ca.key).") var ca: String
    @Option(help: "A member's host id (`circuit id --data DIR` prints it).") var host: String?
    @Option(help: "A client's name.") var client: String?
    @Option(help: "A client's roles, comma-separated: read, write, exec, admin.") var role: String?
    @Option(help: "IP addresses or DNS names for the subject alternative names, comma-separated (for other tools).")
    var address: String?
    @Option(help: "Days the certificate is valid.") var days = 365
    @Option(help: "Where to write (default: the CA folder).") var out: String?

    func run() throws {
        let name: String
        let roles: Set<AccessRole>
        switch (host, client) {
        case (let host?, nil):
            guard HostID.isValid(host) else { throw ValidationError("--host \(host) is not a host id (X and 16 lowercase hex digits)") }
            if role != nil { throw ValidationError("a member's certificate carries the host role: --role is for clients") }
            (name, roles) = (host, [.host])
        case (nil, let client?):
            roles = try AccessRole.list(role ?? "read")
            if roles.contains(.host) { throw ValidationError("the host role is for members: issue it with --host") }
            name = client
        default:
            throw ValidationError("give --host X<id> for a member or --client NAME for a client")
        }
        let authority = try CertificateAuthority.load(directory: ca)
        let issued = try authority.issue(
            name: name, roles: roles, addresses: address.map { $0.split(separator: ",").map(String.init) } ?? [], days: days)
        let paths = try issued.write(directory: out ?? ca, name: name)
        print("issued \(name) [\(roles.sorted().map(\.rawValue).joined(separator: ","))]: \(paths.certificate), \(paths.key)")
    }
}

/// The TLS identity a client verb uses: --tls-ca/--tls-cert/--tls-key, then $CIRCUIT_TLS_CA/_CERT/_KEY.
struct ClientTLSOptions: ParsableArguments {
    @Option(help: "The cluster's CA certificate (default: $CIRCUIT_TLS_CA).") var tlsCa: String?
    @Option(help: "This client's certificate (default: $CIRCUIT_TLS_CERT).") var tlsCert: String?
    @Option(help: "This client's key (default: $CIRCUIT_TLS_KEY).") var tlsKey: String?

    /// The identity named, if any; all three or none.
    func load() throws -> TLSFiles? {
        let environment = ProcessInfo.processInfo.environment
        let ca = tlsCa ?? environment["CIRCUIT_TLS_CA"]
        let cert = tlsCert ?? environment["CIRCUIT_TLS_CERT"]
        let key = tlsKey ?? environment["CIRCUIT_TLS_KEY"]
        switch (ca, cert, key) {
        case (nil, nil, nil): return nil
        case (let ca?, let cert?, let key?): return try TLSFiles(ca: ca, certificate: cert, key: key)
        default: throw ValidationError("--tls-ca, --tls-cert and --tls-key (or $CIRCUIT_TLS_CA, _CERT, _KEY) go together")
        }
    }
}
