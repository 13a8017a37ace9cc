import Foundation

/// What a certificate's holder may do. A certificate carries its roles as organizational units of its subject
/// (`OU=read`, `OU=write`, ...), signed by the cluster's CA, so a role cannot be claimed without the CA's key.
///
/// - `read`: status, listings, peeks, record reads, watches, waits.
/// - `write`: records, sessions, channels and selects.
/// - `exec`: processes and jobs (starting, signalling, their standard streams).
/// - `admin`: membership, leadership, debugging; implies the three above.
/// - `host`: a cluster member (its certificate's common name is its host id): the peer port, and everything on the
///   API, since members forward and relay their clients' requests to each other.
public enum AccessRole: String, CaseIterable, Sendable, Comparable {
    case read, write, exec, admin, host

    public static func < (a: AccessRole, b: AccessRole) -> Bool {
        allCases.firstIndex(of: a)! < allCases.firstIndex(of: b)!
    }

    /// Parses `read,write`; an unknown name is an error naming it.
    public static func list(_ text: String) throws(SecurityError) -> Set<AccessRole> {
        var out: Set<AccessRole> = []
        for part in text.split(separator: ",") {
            let name = part.trimmingCharacters(in: .whitespaces)
            guard let role = AccessRole(rawValue: name) else {
                throw .invalid("unknown role \"\(name)\" (roles: \(AccessRole.allCases.map(\.rawValue).joined(separator: ", ")))")
            }
            out.insert(role)
        }
        return out
    }
}

/// The identity a connection's certificate proved: its common name and its roles.
public struct Grant: Sendable, Equatable, CustomStringConvertible {
    public var name: String
    public var roles: Set<AccessRole>

    public init(name: String, roles: Set<AccessRole>) {
        self.name = name
        self.roles = roles
    }

    /// Whether this grant allows what `role` allows: `host` allows everything, `admin` everything but the peer port.
    public func allows(_ role: AccessRole) -> Bool {
        if roles.contains(role) || roles.contains(.host) { return true }
        return roles.contains(.admin) && role != .host
    }

    public var description: String { "\(name) [\(roles.sorted().map(\.rawValue).joined(separator: ","))]" }
}

public enum SecurityError: Error, Sendable, CustomStringConvertible, Equatable {
    case invalid(String)
    case io(String)

    public var description: String {
        switch self {
        case .invalid(let why), .io(let why): return why
        }
    }
}
