import CircuitAPI
import CircuitClient

#if canImport(Glibc)
import Glibc
#endif

/// A failed file operation: the errno the kernel is given, and in words what went wrong (an element's `error` file
/// shows it).
public struct FSError: Error, Sendable, Equatable, CustomStringConvertible {
    public var errno: Int32
    public var message: String

    public init(_ errno: Int32, _ message: String) {
        self.errno = errno
        self.message = message
    }

    public var description: String { "\(message) (errno \(errno))" }

    /// The errno for an API error code (docs/http-api.md); the message is the cluster's.
    public init(_ error: CircuitClientError) {
        switch error {
        case .api(let e): self.init(Self.errno(forCode: e.code), e.message)
        case .unreachable, .noAnswer: self.init(EIO, error.description)
        case .badAnswer: self.init(EIO, error.description)
        }
    }

    public static func errno(forCode code: String) -> Int32 {
        switch code {
        case "exists": return EEXIST
        case "not_found", "no_such_host", "no_such_session": return ENOENT
        case "bad_request", "invalid_name", "malformed_command", "wrong_kind": return EINVAL
        case "host_not_alive", "member_unreachable": return EHOSTDOWN
        case "would_block", "no_leader": return EAGAIN
        case "closed": return EPIPE
        case "too_large": return EFBIG
        case "busy", "version_mismatch": return EBUSY
        case "gone": return ENOENT
        case "not_running": return ESRCH
        case "buffers_full": return ENOBUFS
        case "cancelled": return EINTR
        // The mount's identity lacks the role, or has no certificate the cluster takes.
        case "forbidden", "no_certificate", "bad_certificate": return EACCES
        case "too_many_sessions", "too_many_watches", "too_many_streams": return EUSERS
        default: return EIO
        }
    }
}
