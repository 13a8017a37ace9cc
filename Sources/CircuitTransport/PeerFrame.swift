import CircuitRaft
import NIOCore

/// What travels between two daemons' peer ports.
///
/// On the wire a frame is a 4-byte big-endian length, then that many bytes: a 1-byte type and the type's fields,
/// every integer big-endian, every byte string length-prefixed. A connection opens with `hello` from the dialing
/// side, answered by `welcome` or `refused` (then closed); after that the dialing side sends `raft` batches and
/// `snapshotChunk`s and the accepting side answers snapshot chunks the same way on its own connection.
public enum PeerFrame: Sendable, Hashable {
    /// The handshake: who is calling, for which cluster, speaking which version of this protocol.
    case hello(version: UInt16, clusterID: UInt64, hostID: NodeID)
    /// The handshake is accepted by `hostID`.
    case welcome(hostID: NodeID)
    /// The handshake is refused; the connection closes after this frame.
    case refused(reason: String)
    /// A batch of Raft messages.
    case raft([Message])
    /// A piece of an InstallSnapshot stream, or its acknowledgement.
    case snapshotChunk(SnapshotChunk)

    /// Peers must speak the same version; the handshake refuses any other, naming both. 2: Raft messages of kinds 11
    /// to 14 (a follower's read-index requests and its proposals handed to the leader, and their answers), which a
    /// node of version 1 cannot read.
    public static let protocolVersion: UInt16 = 2
}

/// Why bytes from a peer could not be read as a frame. The connection that sent them is closed.
public enum PeerWireError: Error, Sendable, Hashable, CustomStringConvertible {
    case frameTooLarge(size: Int, limit: Int)
    case truncated(field: String)
    case unknownFrameType(UInt8)
    case unknownMessageKind(UInt8)
    case invalid(String)

    public var description: String {
        switch self {
        case .frameTooLarge(let size, let limit): return "frame of \(size) bytes exceeds the limit of \(limit) bytes"
        case .truncated(let field): return "frame ends inside \(field)"
        case .unknownFrameType(let t): return "unknown frame type \(t)"
        case .unknownMessageKind(let k): return "unknown Raft message kind \(k)"
        case .invalid(let why): return "invalid frame: \(why)"
        }
    }
}

/// Encodes and decodes frames.
public enum PeerCodec {
    private enum FrameType: UInt8 {
        case hello = 1, welcome = 2, refused = 3, raft = 4, snapshotChunk = 5
    }

    /// Appends `frame`, length prefix included, to `buffer`.
    public static func encode(_ frame: PeerFrame, into buffer: inout ByteBuffer) {
        let lengthAt = buffer.writerIndex
        buffer.writeInteger(UInt32(0))
        switch frame {
        case .hello(let version, let clusterID, let hostID):
            buffer.writeInteger(FrameType.hello.rawValue)
            buffer.writeInteger(version)
            buffer.writeInteger(clusterID)
            buffer.writeInteger(hostID)
        case .welcome(let hostID):
            buffer.writeInteger(FrameType.welcome.rawValue)
            buffer.writeInteger(hostID)
        case .refused(let reason):
            buffer.writeInteger(FrameType.refused.rawValue)
            writeBytes(Array(reason.utf8), into: &buffer)
        case .raft(let messages):
            buffer.writeInteger(FrameType.raft.rawValue)
            buffer.writeInteger(UInt32(messages.count))
            for m in messages { encode(m, into: &buffer) }
        case .snapshotChunk(let c):
            buffer.writeInteger(FrameType.snapshotChunk.rawValue)
            buffer.writeInteger(c.kind.rawValue)
            buffer.writeInteger(c.from)
            buffer.writeInteger(c.to)
            buffer.writeInteger(c.term)
            encode(c.snapshot, into: &buffer)
            buffer.writeInteger(c.offset)
            buffer.writeInteger(UInt8(c.last ? 1 : 0))
            writeBytes(c.data, into: &buffer)
        }
        buffer.setInteger(UInt32(buffer.writerIndex - lengthAt - 4), at: lengthAt)
    }

    /// Decodes one frame's payload (without its length prefix); it must be consumed exactly.
    public static func decode(payload: inout ByteBuffer) throws(PeerWireError) -> PeerFrame {
        let raw: UInt8 = try read(&payload, "frame type")
        guard let type = FrameType(rawValue: raw) else { throw .unknownFrameType(raw) }
        let frame: PeerFrame
        switch type {
        case .hello:
            frame = .hello(
                version: try read(&payload, "protocol version"), clusterID: try read(&payload, "cluster id"),
                hostID: try read(&payload, "host id"))
        case .welcome:
            frame = .welcome(hostID: try read(&payload, "host id"))
        case .refused:
            frame = .refused(reason: String(decoding: try readBytes(&payload, "reason"), as: UTF8.self))
        case .raft:
            let count: UInt32 = try read(&payload, "message count")
            // Each message takes at least 70 bytes: a count beyond what is left is a lie, not an allocation.
            guard Int(count) <= payload.readableBytes / 70 + 1 else {
                throw .invalid("\(count) messages claimed in \(payload.readableBytes) bytes")
            }
            var messages: [Message] = []
            messages.reserveCapacity(Int(count))
            for _ in 0..<count { messages.append(try decodeMessage(&payload)) }
            frame = .raft(messages)
        case .snapshotChunk:
            let rawKind: UInt8 = try read(&payload, "chunk kind")
            guard let kind = SnapshotChunk.Kind(rawValue: rawKind) else { throw .invalid("snapshot chunk kind \(rawKind)") }
            let from: NodeID = try read(&payload, "chunk sender")
            let to: NodeID = try read(&payload, "chunk recipient")
            let term: UInt64 = try read(&payload, "chunk term")
            let snapshot = try decodeSnapshot(&payload)
            let offset: UInt64 = try read(&payload, "chunk offset")
            let last: UInt8 = try read(&payload, "chunk last flag")
            let data = try readBytes(&payload, "chunk data")
            frame = .snapshotChunk(
                SnapshotChunk(
                    kind: kind, from: from, to: to, term: term, snapshot: snapshot, offset: offset, data: data,
                    last: last != 0))
        }
        guard payload.readableBytes == 0 else { throw .invalid("\(payload.readableBytes) bytes after the frame's fields") }
        return frame
    }

    // MARK: - Raft messages

    private static func encode(_ m: Message, into buffer: inout ByteBuffer) {
        buffer.writeInteger(m.kind.rawValue)
        buffer.writeInteger(m.from)
        buffer.writeInteger(m.to)
        buffer.writeInteger(m.term)
        buffer.writeInteger(m.logTerm)
        buffer.writeInteger(m.index)
        buffer.writeInteger(m.commit)
        buffer.writeInteger(UInt8(m.reject ? 1 : 0))
        buffer.writeInteger(m.rejectHint)
        buffer.writeInteger(m.context)
        if let s = m.snapshot {
            buffer.writeInteger(UInt8(1))
            encode(s, into: &buffer)
        } else {
            buffer.writeInteger(UInt8(0))
        }
        buffer.writeInteger(UInt32(m.entries.count))
        for e in m.entries {
            buffer.writeInteger(e.term)
            buffer.writeInteger(e.index)
            buffer.writeInteger(e.kind.rawValue)
            writeBytes(e.data, into: &buffer)
        }
    }

    private static func decodeMessage(_ b: inout ByteBuffer) throws(PeerWireError) -> Message {
        let rawKind: UInt8 = try read(&b, "message kind")
        guard let kind = Message.Kind(rawValue: rawKind) else { throw .unknownMessageKind(rawKind) }
        var m = Message(kind: kind, from: try read(&b, "from"), to: try read(&b, "to"), term: try read(&b, "term"))
        m.logTerm = try read(&b, "log term")
        m.index = try read(&b, "index")
        m.commit = try read(&b, "commit")
        m.reject = (try read(&b, "reject") as UInt8) != 0
        m.rejectHint = try read(&b, "reject hint")
        m.context = try read(&b, "context")
        if (try read(&b, "snapshot flag") as UInt8) != 0 { m.snapshot = try decodeSnapshot(&b) }
        let count: UInt32 = try read(&b, "entry count")
        guard Int(count) <= b.readableBytes / 21 + 1 else { throw .invalid("\(count) entries claimed in \(b.readableBytes) bytes") }
        m.entries.reserveCapacity(Int(count))
        for _ in 0..<count {
            let term: UInt64 = try read(&b, "entry term")
            let index: UInt64 = try read(&b, "entry index")
            let rawEntryKind: UInt8 = try read(&b, "entry kind")
            guard let entryKind = Entry.Kind(rawValue: rawEntryKind) else { throw .invalid("entry kind \(rawEntryKind)") }
            m.entries.append(Entry(term: term, index: index, kind: entryKind, data: try readBytes(&b, "entry data")))
        }
        return m
    }

    private static func encode(_ s: SnapshotMetadata, into buffer: inout ByteBuffer) {
        buffer.writeInteger(s.index)
        buffer.writeInteger(s.term)
        writeBytes(s.membership.encoded, into: &buffer)
    }

    private static func decodeSnapshot(_ b: inout ByteBuffer) throws(PeerWireError) -> SnapshotMetadata {
        let index: UInt64 = try read(&b, "snapshot index")
        let term: UInt64 = try read(&b, "snapshot term")
        let bytes = try readBytes(&b, "snapshot membership")
        do {
            return SnapshotMetadata(index: index, term: term, membership: try Membership(decoding: bytes))
        } catch {
            throw .invalid("snapshot membership: \(error)")
        }
    }

    // MARK: - Primitives

    private static func writeBytes(_ bytes: [UInt8], into buffer: inout ByteBuffer) {
        buffer.writeInteger(UInt32(bytes.count))
        buffer.writeBytes(bytes)
    }

    private static func read<T: FixedWidthInteger>(_ b: inout ByteBuffer, _ field: String) throws(PeerWireError) -> T {
        guard let v = b.readInteger(as: T.self) else { throw .truncated(field: field) }
        return v
    }

    private static func readBytes(_ b: inout ByteBuffer, _ field: String) throws(PeerWireError) -> [UInt8] {
        let count: UInt32 = try read(&b, "\(field) length")
        guard let bytes = b.readBytes(length: Int(count)) else { throw .truncated(field: field) }
        return bytes
    }
}

/// Splits the byte stream into frames and decodes them; refuses a frame larger than `maxFrameBytes` before
/// reading it, so a peer cannot make this node buffer without bound.
public struct PeerFrameDecoder: ByteToMessageDecoder {
    public typealias InboundOut = PeerFrame
    public let maxFrameBytes: Int

    public init(maxFrameBytes: Int) {
        self.maxFrameBytes = maxFrameBytes
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return .needMoreData }
        guard Int(length) <= maxFrameBytes else {
            throw PeerWireError.frameTooLarge(size: Int(length), limit: maxFrameBytes)
        }
        guard buffer.readableBytes >= 4 + Int(length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: 4)
        var payload = buffer.readSlice(length: Int(length))!
        context.fireChannelRead(Self.wrapInboundOut(try PeerCodec.decode(payload: &payload)))
        return .continue
    }

    public mutating func decodeLast(
        context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool
    ) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue {}
        return .needMoreData
    }
}
