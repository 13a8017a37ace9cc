import CircuitAPI
import Foundation
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

    /// In a stream of receives, the length that says the stream failed midway: one frame follows it, the failure as
    /// JSON (`StreamFailure`: `{"status": 410, "error": {"code": ..., "message": ...}}`), and then the body ends.
    public static let failureMark = UInt32.max
    /// The largest failure frame a reader takes.
    public static let largestFailure = 64 << 10

    /// The stream failed midway: the frame that followed `failureMark`.
    public struct Failed: Error, Sendable {
        public var failure: ByteBuffer
    }

    public let limit: Int
    /// Whether `failureMark` is read as a failure (a stream of receives) rather than as a length.
    private let failures: Bool
    /// The frame being read is the failure.
    private var failing = false
    /// Bytes of a length split across chunks.
    private var header = ByteBuffer()
    /// The message being read: its pieces so far and how many bytes are still to come.
    private var pieces: [ByteBuffer] = []
    private var missing = 0

    /// `limit`: the largest message accepted (a longer length is refused before its bytes are waited for).
    /// `failures`: a stream of receives, which may end with `failureMark` and a failure (thrown as `Failed`).
    public init(limit: Int = Int(UInt32.max), failures: Bool = false) {
        self.limit = limit
        self.failures = failures
    }

    /// Bytes of a message (or of its length) begun and not yet whole: 0 at a boundary between messages.
    public var unfinished: Int {
        missing > 0 ? missing : header.readableBytes > 0 ? 4 - header.readableBytes : 0
    }

    /// The next message `chunk` completes, read out of it: its pieces in order. Nil once `chunk` is used up
    /// without completing one (what it held is kept for the next chunk). Throws `TooLarge`, or `Failed` once a
    /// stream of receives (`failures`) has read its failure.
    public mutating func next(_ chunk: inout ByteBuffer) throws -> [ByteBuffer]? {
        while chunk.readableBytes > 0 {
            if missing > 0 {
                let n = min(missing, chunk.readableBytes)
                pieces.append(chunk.readSlice(length: n)!)
                missing -= n
                guard missing == 0 else { return nil }
                defer { pieces = [] }
                return try message(pieces)
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
            if failures, !failing, length == Int(Self.failureMark) {
                failing = true
                continue
            }
            let limit = failing ? Self.largestFailure : limit
            guard length <= limit else { throw TooLarge(length: length, limit: limit) }
            if length <= chunk.readableBytes { return try message([chunk.readSlice(length: length)!]) }
            missing = length
        }
        return nil
    }

    /// A whole frame: a message, or the failure.
    private func message(_ pieces: [ByteBuffer]) throws(Failed) -> [ByteBuffer] {
        guard failing else { return pieces }
        var failure = ByteBuffer()
        for piece in pieces { failure.writeImmutableBuffer(piece) }
        throw Failed(failure: failure)
    }
}

/// Writes the framing MessageFrameReader reads. Small messages are gathered with their lengths into one buffer; a
/// large one (`largeMessage` bytes or more) goes out as the buffers it is held in, not copied. A pure value: the
/// caller writes out what `take()` answers, in one vectored write.
public struct MessageFrameWriter: Sendable {
    /// Messages this size or larger are not copied (and, where they are read, not copied out of the read buffers).
    public static let largeMessage = 1 << 16

    private var parts: [ByteBuffer] = []
    private var frames = ByteBuffer()
    /// Bytes appended (lengths included) since the last `take()`.
    public private(set) var bytes = 0

    public init() {}

    /// Appends a message of `length` bytes held in the buffers `pieces` hands to its argument, in order.
    public mutating func append(length: Int, pieces: ((ByteBuffer) -> Void) -> Void) {
        frames.writeInteger(UInt32(length))
        if length < Self.largeMessage {
            pieces { frames.writeImmutableBuffer($0) }
        } else {
            parts.append(frames)
            frames = ByteBuffer()
            pieces { parts.append($0) }
        }
        bytes += 4 + length
    }

    /// Appends a message held in one buffer.
    public mutating func append(_ message: ByteBuffer) {
        append(length: message.readableBytes) { $0(message) }
    }

    /// Appends the end of a stream of receives that failed: `failureMark`, then the failure as a frame. Nothing
    /// may follow it.
    public mutating func appendFailure(_ failure: StreamFailure) {
        frames.writeInteger(MessageFrameReader.failureMark)
        // Encoding a struct of an integer and two strings cannot fail.
        append(ByteBuffer(bytes: (try? JSONEncoder().encode(failure)) ?? Data()))
    }

    /// What to write, in order; the writer is empty after.
    public mutating func take() -> [ByteBuffer] {
        if frames.readableBytes > 0 { parts.append(frames) }
        defer {
            parts = []
            frames = ByteBuffer()
            bytes = 0
        }
        return parts
    }
}
