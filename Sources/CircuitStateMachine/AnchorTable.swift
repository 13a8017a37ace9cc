/// The anchors of the namespace by path.
///
/// A dictionary keyed by `String` hashes the whole path at every lookup and again at every growth of the table, and
/// compares whole paths along each probe (paths share long prefixes, so each comparison runs far into the bytes).
/// Here each key carries its hash, computed once: lookups and growth hash 8 bytes, and a probe compares two integers
/// before it compares paths. The hash is Swift's seeded one, so crafted names cannot make paths collide; it never
/// leaks into results, events or snapshots, which stay deterministic.
public struct AnchorTable: Sendable, Equatable, Sequence {
    struct Key: Hashable, Sendable {
        let path: String
        let hash: Int

        init(_ path: String) {
            self.path = path
            self.hash = path.hashValue
        }

        static func == (a: Key, b: Key) -> Bool { a.hash == b.hash && a.path == b.path }
        func hash(into hasher: inout Hasher) { hasher.combine(hash) }

        /// What the dictionary asks for at every lookup and, for every key, at every growth: the cached hash mixed
        /// with the table's seed (murmur3's finaliser), instead of a SipHash of 8 bytes each time. The cached hash is
        /// already seeded and unpredictable; the table's seed keeps tables of different sizes from sharing an order.
        func _rawHashValue(seed: Int) -> Int {
            var x = UInt64(bitPattern: Int64(hash ^ seed))
            x = (x ^ (x >> 33)) &* 0xff51_afd7_ed55_8ccd
            x = (x ^ (x >> 33)) &* 0xc4ce_b9fe_1a85_ec53
            return Int(Int64(bitPattern: x ^ (x >> 33)))
        }
    }

    private var table: [Key: Anchor] = [:]

    public init() {}

    public subscript(path: String) -> Anchor? { table[Key(path)] }

    subscript(key: Key) -> Anchor? {
        get { table[key] }
        set { table[key] = newValue }
    }

    public var count: Int { table.count }
    public var isEmpty: Bool { table.isEmpty }

    /// Every path, sorted.
    public var sortedPaths: [String] { table.keys.map(\.path).sorted() }

    mutating func reserveCapacity(_ n: Int) { table.reserveCapacity(n) }

    public func makeIterator() -> some IteratorProtocol<(path: String, anchor: Anchor)> {
        table.lazy.map { (path: $0.key.path, anchor: $0.value) }.makeIterator()
    }
}
