import NIOCore

/// A channel's message: its bytes as they were read from the sender's connection, in one buffer, or, for a large
/// message that arrived over several reads of the socket, in those reads' slices. The slices are kept and written to
/// the receiver as they are: gathering them into one buffer would copy every byte once more on its way through.
struct ChanMessage: Sendable, Hashable, ExpressibleByArrayLiteral {
    private enum Storage: Sendable {
        case one(ByteBuffer)
        case pieces([ByteBuffer])
    }

    private let storage: Storage
    /// The message's length in bytes.
    let byteCount: Int

    init(_ buffer: ByteBuffer) {
        storage = .one(buffer)
        byteCount = buffer.readableBytes
    }

    /// A message made of these pieces, in order (an empty list is the empty message).
    init(pieces: [ByteBuffer]) {
        switch pieces.count {
        case 0: storage = .one(ByteBuffer())
        case 1: storage = .one(pieces[0])
        default: storage = .pieces(pieces)
        }
        byteCount = pieces.reduce(0) { $0 + $1.readableBytes }
    }

    init(arrayLiteral bytes: UInt8...) {
        self.init(ByteBuffer(bytes: bytes))
    }

    /// The pieces, in order: one unless the message arrived in several.
    var pieces: [ByteBuffer] {
        switch storage {
        case .one(let b): return [b]
        case .pieces(let p): return p
        }
    }

    /// The message in one buffer: its own if it has one, else a copy of its pieces gathered.
    var gathered: ByteBuffer {
        switch storage {
        case .one(let b): return b
        case .pieces: return copied
        }
    }

    /// The message's bytes in a buffer of their own (always a copy).
    var copied: ByteBuffer {
        var whole = ByteBuffer()
        whole.reserveCapacity(byteCount)
        forEachPiece { whole.writeImmutableBuffer($0) }
        return whole
    }

    /// Calls `body` with each piece in order, without making a list of one.
    func forEachPiece(_ body: (ByteBuffer) throws -> Void) rethrows {
        switch storage {
        case .one(let b): try body(b)
        case .pieces(let p): for piece in p { try body(piece) }
        }
    }

    /// Equal bytes, however they are split.
    static func == (a: ChanMessage, b: ChanMessage) -> Bool {
        a.byteCount == b.byteCount && a.gathered == b.gathered
    }

    func hash(into hasher: inout Hasher) {
        hasher.combine(gathered)
    }
}
