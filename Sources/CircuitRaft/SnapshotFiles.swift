import Foundation
import Logging

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Snapshot files in one folder, written so that a crash at any moment leaves either the old snapshot or the new
/// one, never a mixture: each file is written under a temporary name, fsync'd, renamed into place, and the folder
/// fsync'd. The log store's metadata names the snapshot in effect; it is updated only after the file is durable,
/// and older files are removed only after that.
///
/// A file is `snap-<index>-<term>.snap` (16 hex digits each) and holds: the magic `CIRCSNAP`, a format version
/// (UInt32), the index and term (UInt64), the membership's length (UInt32) and bytes, the payload's length (UInt64)
/// and bytes, and a 64-bit checksum of everything before it (FNV-1a over 8-byte words, with a shift to mix).
/// Numbers are big-endian.
public final class SnapshotFiles: Sendable {
    public let directory: String
    private let logger: Logger
    private static let magic = Array("CIRCSNAP".utf8)
    private static let version: UInt32 = 1

    public init(directory: String, logger: Logger) throws {
        self.directory = directory
        self.logger = logger
        if mkdir(directory, 0o755) != 0 && errno != EEXIST {
            throw SnapshotFileError.io(path: directory, operation: "mkdir", errno: errno)
        }
        // Leftovers of writes that a crash interrupted.
        for name in try listDirectory(directory) where name.hasSuffix(".tmp") {
            unlink("\(directory)/\(name)")
        }
    }

    public func path(for meta: SnapshotMetadata) -> String {
        "\(directory)/snap-\(hex(meta.index))-\(hex(meta.term)).snap"
    }

    /// Writes a snapshot durably and atomically, at most `bytesPerSecond` if given (so that a large snapshot does not
    /// take the disk from the log's fsyncs).
    ///
    /// The payload is written from where it is, a MiB at a time: not copied into the file's bytes first (a snapshot
    /// of a large state would be held twice meanwhile).
    public func write(_ meta: SnapshotMetadata, payload: [UInt8], bytesPerSecond: Int? = nil) throws {
        let receiver = try SnapshotReceiver(files: self, meta: meta)
        let header = Self.header(meta, payloadCount: payload.count)
        var sum = Checksum()
        header.withUnsafeBytes { sum.add($0) }
        try receiver.append(offset: 0, header)
        let step = 1 << 20
        let clock = ContinuousClock()
        let start = clock.now
        var offset = 0
        while offset < payload.count {
            let end = min(payload.count, offset + step)
            try payload.withUnsafeBytes { all in
                let piece = UnsafeRawBufferPointer(rebasing: all[offset..<end])
                sum.add(piece)
                try receiver.append(offset: UInt64(header.count + offset), piece)
            }
            offset = end
            if let rate = bytesPerSecond, rate > 0 {
                let due = start + .milliseconds(offset * 1000 / rate)
                if clock.now < due { Thread.sleep(forTimeInterval: (due - clock.now) / .seconds(1)) }
            }
        }
        var trailer: [UInt8] = []
        appendBigEndian(sum.value, to: &trailer)
        try receiver.append(offset: UInt64(header.count + payload.count), trailer)
        try receiver.finish(verify: false)  // written from memory just now: no need to read it back
    }

    /// The payload of a stored snapshot, after checking its checksum and that it is the one named.
    public func load(_ meta: SnapshotMetadata) throws -> [UInt8] {
        let bytes = try readFile(path(for: meta))
        let (decoded, payload) = try Self.decode(bytes, path: path(for: meta))
        guard decoded == meta else {
            throw SnapshotFileError.corrupt(path: path(for: meta), detail: "it holds \(decoded), not \(meta)")
        }
        return payload
    }

    /// The size of a stored snapshot file, for streaming it.
    public func fileSize(_ meta: SnapshotMetadata) throws -> UInt64 {
        var st = stat()
        guard stat(path(for: meta), &st) == 0 else {
            throw SnapshotFileError.io(path: path(for: meta), operation: "stat", errno: errno)
        }
        return UInt64(st.st_size)
    }

    /// Raw bytes of a stored snapshot file, for streaming it to a peer.
    public func readChunk(_ meta: SnapshotMetadata, offset: UInt64, maxBytes: Int) throws -> [UInt8] {
        let p = path(for: meta)
        let fd = open(p, O_RDONLY)
        guard fd >= 0 else { throw SnapshotFileError.io(path: p, operation: "open", errno: errno) }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: maxBytes)
        let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, maxBytes, off_t(offset)) }
        guard n >= 0 else { throw SnapshotFileError.io(path: p, operation: "pread", errno: errno) }
        buffer.removeSubrange(n...)
        return buffer
    }

    /// Starts receiving the raw bytes of a snapshot file streamed by a peer.
    public func receiver(for meta: SnapshotMetadata) throws -> SnapshotReceiver {
        try SnapshotReceiver(files: self, meta: meta)
    }

    /// Removes the snapshot files older than the one named (call once the store names it). Newer files are left:
    /// one may have been installed meanwhile, and a cleanup running late must never delete it.
    public func removeAll(except meta: SnapshotMetadata?) {
        let keep = meta.map { path(for: $0) }
        for name in (try? listDirectory(directory)) ?? [] where name.hasSuffix(".snap") {
            let p = "\(directory)/\(name)"
            guard p != keep else { continue }
            // snap-<index>-<term>.snap
            let index = name.split(separator: "-").dropFirst().first.flatMap { UInt64($0, radix: 16) }
            if let meta, let index, index >= meta.index { continue }
            unlink(p)
        }
    }

    // MARK: - Format

    /// The bytes of a snapshot file (what `write` stores and what a peer streams).
    public static func encode(_ meta: SnapshotMetadata, payload: [UInt8]) -> [UInt8] {
        var out = header(meta, payloadCount: payload.count)
        out.reserveCapacity(out.count + payload.count + 8)
        out += payload
        appendBigEndian(checksum(out[...]), to: &out)
        return out
    }

    /// What comes before the payload: the format, the snapshot's index, term and membership, the payload's size.
    static func header(_ meta: SnapshotMetadata, payloadCount: Int) -> [UInt8] {
        var out: [UInt8] = []
        let membership = meta.membership.encoded
        out.reserveCapacity(40 + membership.count)
        out += magic
        appendBigEndian(version, to: &out)
        appendBigEndian(meta.index, to: &out)
        appendBigEndian(meta.term, to: &out)
        appendBigEndian(UInt32(membership.count), to: &out)
        out += membership
        appendBigEndian(UInt64(payloadCount), to: &out)
        return out
    }

    static func decode(_ bytes: [UInt8], path: String) throws -> (SnapshotMetadata, [UInt8]) {
        func corrupt(_ detail: String) -> SnapshotFileError { .corrupt(path: path, detail: detail) }
        guard bytes.count >= 8 + 4 + 8 + 8 + 4 + 8 + 8 else { throw corrupt("only \(bytes.count) bytes") }
        guard Array(bytes[0..<8]) == magic else { throw corrupt("not a snapshot file") }
        let body = bytes[..<(bytes.count - 8)]
        guard readBigEndian(bytes, at: bytes.count - 8) == checksum(body) else { throw corrupt("checksum mismatch (torn write?)") }
        var at = 8
        let version = UInt32(truncatingIfNeeded: readBigEndian(bytes, at: at, width: 4))
        guard version == Self.version else { throw corrupt("format version \(version)") }
        at += 4
        let index = readBigEndian(bytes, at: at)
        let term = readBigEndian(bytes, at: at + 8)
        at += 16
        let mlen = Int(readBigEndian(bytes, at: at, width: 4))
        at += 4
        guard at + mlen + 8 <= body.count else { throw corrupt("membership overruns the file") }
        let membership = try Membership(decoding: Array(bytes[at..<(at + mlen)]))
        at += mlen
        let plen = Int(readBigEndian(bytes, at: at))
        at += 8
        guard at + plen == body.count else { throw corrupt("payload length \(plen) does not match the file") }
        return (SnapshotMetadata(index: index, term: term, membership: membership), Array(bytes[at..<(at + plen)]))
    }

    private func hex(_ v: UInt64) -> String {
        let s = String(v, radix: 16)
        return String(repeating: "0", count: 16 - s.count) + s
    }
}

/// Receives a snapshot file in order, under a temporary name; `finish` checks it, makes it durable and renames it.
public final class SnapshotReceiver {
    public let meta: SnapshotMetadata
    private let files: SnapshotFiles
    private let temporary: String
    private var fd: Int32
    public private(set) var received: UInt64 = 0

    init(files: SnapshotFiles, meta: SnapshotMetadata) throws {
        self.files = files
        self.meta = meta
        self.temporary = files.path(for: meta) + ".tmp"
        fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { throw SnapshotFileError.io(path: temporary, operation: "open", errno: errno) }
    }

    deinit { abort() }

    /// Appends the bytes at `offset`, which must be where the previous chunk ended.
    public func append(offset: UInt64, _ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try append(offset: offset, $0) }
    }

    /// The same, from memory the caller holds.
    public func append(offset: UInt64, _ bytes: UnsafeRawBufferPointer) throws {
        guard fd >= 0 else { throw SnapshotFileError.io(path: temporary, operation: "write after close", errno: EBADF) }
        guard offset == received else {
            throw SnapshotFileError.outOfOrder(expected: received, got: offset)
        }
        var done = 0
        while done < bytes.count {
            let piece = min(bytes.count - done, Self.writebackBytes)
            let n = write(fd, bytes.baseAddress! + done, piece)
            guard n > 0 else { throw SnapshotFileError.io(path: temporary, operation: "write", errno: errno) }
            done += n
            // Write back as we go (as RocksDB's bytes_per_sync does): a large snapshot never piles up dirty pages
            // whose flush would make the log's fsyncs wait behind it. The final fsync makes it durable.
            guard fdatasync(fd) == 0 else { throw SnapshotFileError.io(path: temporary, operation: "fdatasync", errno: errno) }
        }
        received += UInt64(bytes.count)
    }

    private static let writebackBytes = 1 << 20

    /// Checks the whole file (unless told not to), fsyncs it, renames it into place and fsyncs the folder.
    public func finish(verify: Bool = true) throws {
        guard fsync(fd) == 0 else { throw SnapshotFileError.io(path: temporary, operation: "fsync", errno: errno) }
        close(fd)
        fd = -1
        if verify {
            let (decoded, _) = try SnapshotFiles.decode(try readFile(temporary), path: temporary)
            guard decoded == meta else {
                throw SnapshotFileError.corrupt(path: temporary, detail: "received \(decoded), expected \(meta)")
            }
        }
        guard rename(temporary, files.path(for: meta)) == 0 else {
            throw SnapshotFileError.io(path: temporary, operation: "rename", errno: errno)
        }
        try fsyncDirectory(files.directory)
    }

    /// Drops the temporary file.
    public func abort() {
        if fd >= 0 {
            close(fd)
            fd = -1
            unlink(temporary)
        }
    }
}

public enum SnapshotFileError: Error, Sendable, CustomStringConvertible {
    case io(path: String, operation: String, errno: Int32)
    case corrupt(path: String, detail: String)
    case outOfOrder(expected: UInt64, got: UInt64)

    public var description: String {
        switch self {
        case .io(let path, let op, let e): return "\(op) of \(path) failed: \(String(cString: strerror(e)))"
        case .corrupt(let path, let detail): return "snapshot file \(path) is corrupt: \(detail)"
        case .outOfOrder(let expected, let got): return "snapshot chunk at offset \(got), expected \(expected)"
        }
    }
}

// MARK: - Helpers

private func appendBigEndian<T: FixedWidthInteger>(_ v: T, to out: inout [UInt8]) {
    withUnsafeBytes(of: v.bigEndian) { out.append(contentsOf: $0) }
}

private func readBigEndian(_ bytes: [UInt8], at: Int, width: Int = 8) -> UInt64 {
    var v: UInt64 = 0
    for b in bytes[at..<(at + width)] { v = v << 8 | UInt64(b) }
    return v
}

/// FNV-1a over 8-byte little-endian words (then the remaining bytes), with a shift after each step so high bits
/// reach low ones. Detects torn and misplaced writes; it is not a cryptographic hash. Bytes may be given in pieces:
/// the value is the same as over all of them at once.
struct Checksum {
    private var hash: UInt64 = 0xCBF2_9CE4_8422_2325
    /// The bytes of an unfinished 8-byte word (fewer than 8).
    private var carry: [UInt8] = []

    mutating func add(_ raw: UnsafeRawBufferPointer) {
        var at = 0
        if !carry.isEmpty {
            while carry.count < 8 && at < raw.count {
                carry.append(raw[at])
                at += 1
            }
            guard carry.count == 8 else { return }
            word(carry.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })
            carry.removeAll(keepingCapacity: true)
        }
        while at + 8 <= raw.count {
            word(raw.loadUnaligned(fromByteOffset: at, as: UInt64.self))
            at += 8
        }
        carry.append(contentsOf: raw[at...])
    }

    var value: UInt64 {
        var h = hash
        for b in carry { h = (h ^ UInt64(b)) &* 0x100_0000_01B3 }
        return h
    }

    private mutating func word(_ w: UInt64) {
        hash = (hash ^ UInt64(littleEndian: w)) &* 0x100_0000_01B3
        hash ^= hash >> 29
    }
}

/// `Checksum` over `bytes` at once.
func checksum(_ bytes: ArraySlice<UInt8>) -> UInt64 {
    var sum = Checksum()
    bytes.withUnsafeBytes { sum.add($0) }
    return sum.value
}

private func readFile(_ path: String) throws -> [UInt8] {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { throw SnapshotFileError.io(path: path, operation: "open", errno: errno) }
    defer { close(fd) }
    var st = stat()
    guard fstat(fd, &st) == 0 else { throw SnapshotFileError.io(path: path, operation: "fstat", errno: errno) }
    let size = Int(st.st_size)
    var buffer = [UInt8](repeating: 0, count: size)
    var done = 0
    while done < size {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress! + done, size - done) }
        guard n > 0 else { throw SnapshotFileError.io(path: path, operation: "read", errno: n == 0 ? EIO : errno) }
        done += n
    }
    return buffer
}

private func listDirectory(_ path: String) throws -> [String] {
    guard let dir = opendir(path) else { throw SnapshotFileError.io(path: path, operation: "opendir", errno: errno) }
    defer { closedir(dir) }
    var names: [String] = []
    while let entry = readdir(dir) {
        let name = withUnsafePointer(to: entry.pointee.d_name) {
            $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
        }
        if name != "." && name != ".." { names.append(name) }
    }
    return names
}
