import CircuitAPI
import CircuitStateMachine

/// The mount's layout, as in the slides: what each path of the file system is, with no I/O.
///
///     /                          the live hosts X<16 hex>/, records/, help
///     /X<host>/                  dc/, sys/, help
///     /X<host>/sys/              cpus, memory, load, raft, status (read-only facts of that host and its daemon)
///     /X<host>/dc/               proc/, chan/, select/, help
///     /X<host>/dc/proc/NAME/     the process /X<host>/NAME: env error help run signal stat stderr stdin stdout waitexit
///     /X<host>/dc/chan/NAME/     the channel /X<host>/NAME: cap close error help recv send stat tryrecv trysend
///     /X<host>/dc/select/NAME/   the select /X<host>/NAME: abort error help message select wait
///     /records/A/B               the record /records/A/B (a file), or a directory of records
public enum ElementKind: String, Sendable, Hashable, CaseIterable {
    case proc, chan, select

    /// The files in an element's directory, with their permission bits.
    public var files: [(name: String, mode: UInt32)] {
        switch self {
        case .proc:
            return [
                ("env", 0o444), ("error", 0o444), ("help", 0o444), ("run", 0o666), ("signal", 0o222), ("stat", 0o444),
                ("stderr", 0o444), ("stdin", 0o222), ("stdout", 0o444), ("waitexit", 0o444),
            ]
        case .chan:
            return [
                ("cap", 0o666), ("close", 0o222), ("error", 0o444), ("help", 0o444), ("recv", 0o444), ("send", 0o222),
                ("stat", 0o444), ("tryrecv", 0o444), ("trysend", 0o222),
            ]
        case .select:
            return [
                ("abort", 0o222), ("error", 0o444), ("help", 0o444), ("message", 0o444), ("select", 0o666),
                ("wait", 0o444),
            ]
        }
    }

    public func mode(of file: String) -> UInt32? { files.first { $0.name == file }?.mode }
}

/// One node of the mounted tree. Element and record paths are the API's paths (`/X<host>/NAME`, `/records/...`).
public enum FSNode: Sendable, Hashable {
    case root
    case rootHelp
    case host(String)
    case hostHelp(String)
    case sys(String)
    case sysFile(String, String)
    case dc(String)
    case dcHelp(String)
    case kindDir(String, ElementKind)
    case element(String, ElementKind, String)
    case elementFile(String, ElementKind, String, String)
    /// A directory of records (`/records` itself, or an anchor with children).
    case recordDir(String)
    case record(String)

    public static let sysFiles = ["cpus", "load", "memory", "raft", "status"]
    public static let recordsRoot = "/records"

    public var isDirectory: Bool {
        switch self {
        case .root, .host, .sys, .dc, .kindDir, .element, .recordDir: return true
        case .rootHelp, .hostHelp, .sysFile, .dcHelp, .elementFile, .record: return false
        }
    }

    /// Permission bits (the type bits are added from `isDirectory`).
    public var permissions: UInt32 {
        switch self {
        case .root, .host, .sys: return 0o555
        case .dc, .element: return 0o555
        case .kindDir, .recordDir: return 0o777
        case .rootHelp, .hostHelp, .sysFile, .dcHelp: return 0o444
        case .elementFile(_, let kind, _, let file): return kind.mode(of: file) ?? 0o444
        case .record: return 0o666
        }
    }

    /// The namespace path of the element this node belongs to, if any.
    public var elementPath: String? {
        switch self {
        case .element(let host, _, let name), .elementFile(let host, _, let name, _): return "/\(host)/\(name)"
        default: return nil
        }
    }

    /// A child of this directory whose existence follows from the layout alone (no question to the cluster), or nil.
    public func fixedChild(_ name: String) -> FSNode? {
        switch self {
        case .root: return name == "help" ? .rootHelp : nil
        case .host(let h):
            switch name {
            case "dc": return .dc(h)
            case "sys": return .sys(h)
            case "help": return .hostHelp(h)
            default: return nil
            }
        case .sys(let h): return Self.sysFiles.contains(name) ? .sysFile(h, name) : nil
        case .dc(let h):
            if name == "help" { return .dcHelp(h) }
            return ElementKind(rawValue: name).map { .kindDir(h, $0) }
        case .element(let h, let kind, let e): return kind.mode(of: name) != nil ? .elementFile(h, kind, e, name) : nil
        default: return nil
        }
    }

    /// The children of a directory whose names the layout fixes (hosts, elements and records are asked for).
    public var fixedChildren: [(String, FSNode)] {
        switch self {
        case .root: return [("help", .rootHelp)]
        case .host(let h): return [("dc", .dc(h)), ("help", .hostHelp(h)), ("sys", .sys(h))]
        case .sys(let h): return Self.sysFiles.map { ($0, .sysFile(h, $0)) }
        case .dc(let h): return [("help", .dcHelp(h))] + ElementKind.allCases.map { ($0.rawValue, .kindDir(h, $0)) }
        case .element(let h, let kind, let e): return kind.files.map { ($0.name, .elementFile(h, kind, e, $0.name)) }
        default: return []
        }
    }

    /// Whether `name` can be a host directory: `X` and 16 hex digits.
    public static func isHostName(_ name: String) -> Bool {
        Names.isHostID(name)
    }
}

/// What an element's path in the namespace peeked as.
public enum PeekedKind: Sendable, Equatable {
    case element(ElementKind)
    /// A name taken (by mkdir) for an element of this kind, not made yet.
    case reserved(ElementKind)
    case record
    /// An anchor that only has children.
    case directory
    case other
    case missing

    public init(kind: String, reserves: String? = nil) {
        switch kind {
        case "reserved": self = reserves.flatMap(ElementKind.init(rawValue:)).map { .reserved($0) } ?? .other
        case "proc": self = .element(.proc)
        case "chan": self = .element(.chan)
        case "select": self = .element(.select)
        case "record": self = .record
        case "none": self = .directory
        default: self = .other
        }
    }

    /// What a peek answered.
    public init(_ view: ElementView) { self.init(kind: view.kind, reserves: view.reserves) }

    /// An element of `kind`, made or only reserved.
    public func isElement(_ kind: ElementKind) -> Bool { self == .element(kind) || self == .reserved(kind) }
}
