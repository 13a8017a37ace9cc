/// The kernel's inode numbers for the mount's nodes, with FUSE's lookup counts: a node keeps its number while the
/// kernel holds a reference (every entry replied counts one lookup; `forget` gives them back). The root is 1 and is
/// never forgotten. A pure value: the FUSE shell keeps it under a lock.
public struct InodeTable: Sendable {
    public static let rootInode: UInt64 = 1

    private var nodes: [UInt64: (node: FSNode, lookups: UInt64)] = [InodeTable.rootInode: (.root, 1)]
    private var inodes: [FSNode: UInt64] = [.root: InodeTable.rootInode]
    private var next: UInt64 = 2

    public init() {}

    public var count: Int { nodes.count }

    public func node(_ inode: UInt64) -> FSNode? { nodes[inode]?.node }

    /// The inode of `node`, counting one more lookup (the kernel was given an entry for it).
    public mutating func lookUp(_ node: FSNode) -> UInt64 {
        if let inode = inodes[node] {
            nodes[inode]!.lookups += 1
            return inode
        }
        let inode = next
        next += 1
        nodes[inode] = (node, 1)
        inodes[node] = inode
        return inode
    }

    /// The inode of `node` if it has one, without counting a lookup (a directory listing's entries).
    public func existing(_ node: FSNode) -> UInt64? { inodes[node] }

    /// The kernel forgot `count` lookups of `inode`; the number is freed when none are left.
    public mutating func forget(_ inode: UInt64, count: UInt64) {
        guard inode != Self.rootInode, let entry = nodes[inode] else { return }
        if entry.lookups > count {
            nodes[inode]!.lookups = entry.lookups - count
        } else {
            nodes[inode] = nil
            inodes[entry.node] = nil
        }
    }
}
