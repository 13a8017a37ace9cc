import NIOCore

/// Reads the framing of a stream of channel messages (a streamed send's body, a streamed receive's answer): each
/// message a 4-byte big-endian length, then its bytes. Chunks are handed in as they were read; each message comes
/// out as the slices of the chunks it lies in (one if it lies within one), never copied. A pure value: the caller
/// owns the I/O.
public struct MessageFrameReader: Sendable {
    /// A message's length above the reader's limit.
    public struct TooLarge: Error, Sendable, Equatable {
        public var length: Int
        public var limit: Int
    }

    public let limit: Int
    /// Bytes of a length split across chunks.
    private var header = ByteBuffer()
    /// The message being read: its pieces so far and how many bytes are still to come.
    private var pieces: [ByteBuffer] = []
    private var missing = 0

    /// `limit`: the largest message accepted (a longer length is refused before its bytes are waited for).
    public init(limit: Int = Int(UInt32.max)) {
        self.limit = limit
    }

    /// Bytes of a message (or of its length) begun and not yet whole: 0 at a boundary between messages.
    public var unfinished: Int {
        missing > 0 ? missing : header.readableBytes > 0 ? 4 - header.readableBytes : 0
    }

    /// The next message `chunk` completes, read out of it: its pieces in order. Nil once `chunk` is used up
    /// without completing one (what it held is kept for the next chunk).
    public mutating func next(_ chunk: inout ByteBuffer) throws(TooLarge) -> [ByteBuffer]? {
        while chunk.readableBytes > 0 {
            if missing > 0 {
                let n = min(missing, chunk.readableBytes)
                pieces.append(chunk.readSlice(length: n)!)
                missing -= n
                guard missing == 0 else { return nil }
                defer { pieces = [] }
                return pieces
            }
            let length: Int
            if header.readableBytes == 0, let whole = chunk.readInteger(as: UInt32.self) {
                length = Int(whole)
            } else {
                var part = chunk.readSlice(length: min(4 - header.readableBytes, chunk.readableBytes))!
                header.writeBuffer(&part)
                guard let whole = header.readInteger(as: UInt32.self) else { return nil }
                header.clear()
                length = Int(whole)
            }
            guard length <= limit else { throw TooLarge(length: length, limit: limit) }
            if length <= chunk.readableBytes { return [chunk.readSlice(length: length)!] }
            missing = length
        }
        return nil
    }
}
