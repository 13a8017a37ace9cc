import CircuitAPI
import Foundation
import NIOCore
import Testing

@testable import CircuitClient
@testable import CircuitNode

@Suite("The framing of a stream of channel messages, read from chunks as they come")
struct MessageFrameTests {
    /// Messages of awkward lengths: empty, shorter than a length, around the daemon's 64 KiB copy threshold, large.
    static let messages: [[UInt8]] = [0, 1, 3, 4, 5, 65_535, 65_536, 200_000, 0, 7].enumerated().map { i, n in
        (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) }
    }

    static var stream: [UInt8] {
        var out: [UInt8] = []
        for m in messages {
            withUnsafeBytes(of: UInt32(m.count).bigEndian) { out += $0 }
            out += m
        }
        return out
    }

    /// Reads `stream` cut into chunks at `cuts`: the messages, each as its pieces.
    static func read(_ stream: [UInt8], cuts: [Int], limit: Int = .max) throws -> (messages: [[ByteBuffer]], unfinished: Int) {
        var reader = MessageFrameReader(limit: limit)
        var out: [[ByteBuffer]] = []
        var start = 0
        for end in cuts + [stream.count] where end >= start {
            var chunk = ByteBuffer(bytes: stream[start..<end])
            start = end
            while let message = try reader.next(&chunk) { out.append(message) }
            #expect(chunk.readableBytes == 0, "a chunk is always used up")
        }
        return (out, reader.unfinished)
    }

    @Test("every message comes out whole and in order, wherever the chunks are cut (one cut, at every offset near each boundary)")
    func everyCut() throws {
        let stream = Self.stream
        var boundaries: [Int] = [0]
        for m in Self.messages { boundaries.append(boundaries.last! + 4 + m.count) }
        var offsets = Set<Int>()
        for b in boundaries { for d in -6...6 where (0...stream.count).contains(b + d) { offsets.insert(b + d) } }
        for cut in offsets.sorted() {
            let (messages, unfinished) = try Self.read(stream, cuts: [cut])
            #expect(messages.map { $0.flatMap { Array(buffer: $0) } } == Self.messages, "cut at \(cut)")
            #expect(unfinished == 0)
        }
    }

    @Test("a message within one chunk is one slice of it; one spread over several is a slice of each, not gathered")
    func pieces() throws {
        let stream = Self.stream
        let whole = try Self.read(stream, cuts: [])
        #expect(whole.messages.allSatisfy { $0.count == 1 })
        // Chunks of 1,000 bytes: the 200,000-byte message spans 201 or 202 of them.
        let cuts = Array(stride(from: 1000, to: stream.count, by: 1000))
        let small = try Self.read(stream, cuts: cuts)
        #expect(small.messages.map { $0.flatMap { Array(buffer: $0) } } == Self.messages)
        let large = try #require(small.messages.first { $0.reduce(0) { $0 + $1.readableBytes } == 200_000 })
        #expect((201...202).contains(large.count))
        // Byte by byte: every length is split, and still read.
        let bytewise = try Self.read(Array(stream.prefix(4 + 0 + 4 + 1 + 4 + 3)), cuts: Array(1..<16))
        #expect(bytewise.messages.map { $0.flatMap { Array(buffer: $0) } } == Array(Self.messages.prefix(3)))
    }

    @Test("a stream that stops inside a message or its length says how much is missing")
    func unfinished() throws {
        let stream = Self.stream
        #expect(try Self.read(Array(stream.prefix(2)), cuts: []).unfinished == 2, "half a length")
        #expect(try Self.read(Array(stream.prefix(4 + 0 + 4 + 1 + 4 + 1)), cuts: []).unfinished == 2, "a third message, 1 of 3 bytes")
    }

    @Test("a length above the limit is refused before its bytes are waited for")
    func limit() throws {
        var length = ByteBuffer()
        length.writeInteger(UInt32(70_000))
        var reader = MessageFrameReader(limit: 65_536)
        #expect(throws: MessageFrameReader.TooLarge(length: 70_000, limit: 65_536)) { _ = try reader.next(&length) }
    }
}

@Suite("A stream of receives that fails midway: its failure frame, written and read")
struct MessageFrameFailureTests {
    static let failure = StreamFailure(APIError(status: 410, code: "gone", message: "/X1/c was removed"))

    /// Two messages, then the failure: as the writer writes it, in one stream of bytes.
    static var stream: [UInt8] {
        var writer = MessageFrameWriter()
        writer.append(ByteBuffer(bytes: [1, 2, 3]))
        writer.append(ByteBuffer(bytes: [UInt8](repeating: 9, count: 70_000)))
        writer.appendFailure(failure)
        return writer.take().flatMap { Array(buffer: $0) }
    }

    @Test("a reader of receives hands over the messages before the failure, then throws the failure, wherever the chunks are cut")
    func read() throws {
        let stream = Self.stream
        for cut in Array(0...12) + Array(stream.count - 80..<stream.count) {
            var reader = MessageFrameReader(failures: true)
            var messages: [[UInt8]] = []
            var failed: ByteBuffer?
            do {
                for part in [stream[..<cut], stream[cut...]] {
                    var chunk = ByteBuffer(bytes: part)
                    while let message = try reader.next(&chunk) { messages.append(message.flatMap { Array(buffer: $0) }) }
                }
            } catch let error as MessageFrameReader.Failed {
                failed = error.failure
            }
            #expect(messages == [[1, 2, 3], [UInt8](repeating: 9, count: 70_000)], "cut at \(cut)")
            let failure = try #require(failed, "cut at \(cut): the failure is thrown")
            #expect(try JSONDecoder().decode(StreamFailure.self, from: Data(failure.readableBytesView)) == Self.failure)
            #expect(Self.failure.apiError == APIError(status: 410, code: "gone", message: "/X1/c was removed"))
        }
    }

    @Test("a reader of sends takes the mark as a length, refused by its limit; a failure frame larger than 64 KiB is refused")
    func notAFailure() throws {
        var mark = ByteBuffer()
        mark.writeInteger(MessageFrameReader.failureMark)
        var sends = MessageFrameReader(limit: 1 << 20)
        var chunk = mark
        #expect(throws: MessageFrameReader.TooLarge(length: Int(UInt32.max), limit: 1 << 20)) { _ = try sends.next(&chunk) }
        var receives = MessageFrameReader(failures: true)
        chunk = mark
        chunk.writeInteger(UInt32(70_000))
        #expect(throws: MessageFrameReader.TooLarge(length: 70_000, limit: MessageFrameReader.largestFailure)) { _ = try receives.next(&chunk) }
    }
}

@Suite("The framing of a stream of channel messages, written")
struct MessageFrameWriterTests {
    @Test("what the writer writes is the stream the reader reads: small messages gathered with their lengths, a large one its own buffer, not copied")
    func writes() throws {
        var writer = MessageFrameWriter()
        for m in MessageFrameTests.messages { writer.append(ByteBuffer(bytes: m)) }
        #expect(writer.bytes == MessageFrameTests.stream.count)
        let parts = writer.take()
        #expect(parts.flatMap { Array(buffer: $0) } == MessageFrameTests.stream)
        // Gathered: lengths and the messages under 64 KiB (six with their lengths, then the next one's length);
        // alone: each of the two large messages (65,536 and 200,000 bytes).
        #expect(parts.map(\.readableBytes) == [6 * 4 + (0 + 1 + 3 + 4 + 5 + 65_535) + 4, 65_536, 4, 200_000, 4 + 0 + 4 + 7])
        #expect(writer.bytes == 0 && writer.take().isEmpty, "take() empties the writer")
        // A large message given as pieces goes out as those pieces.
        let large = ByteBuffer(bytes: MessageFrameTests.messages[7])
        writer.append(length: large.readableBytes) { each in
            each(large.getSlice(at: 0, length: 1000)!)
            each(large.getSlice(at: 1000, length: large.readableBytes - 1000)!)
        }
        let pieces = writer.take()
        #expect(pieces.map(\.readableBytes) == [4, 1000, large.readableBytes - 1000])
        var reader = MessageFrameReader()
        var stream = ByteBuffer(bytes: pieces.flatMap { Array(buffer: $0) })
        #expect(try reader.next(&stream).map { ChanMessage(pieces: $0) } == ChanMessage(large))
    }
}

@Suite("A channel's message kept as the pieces it arrived in")
struct ChanMessageTests {
    @Test("equal bytes are equal messages, however they are split; gathered and copied give the bytes")
    func pieces() {
        let bytes = (0..<100).map { UInt8($0) }
        let one = ChanMessage(ByteBuffer(bytes: bytes))
        let three = ChanMessage(pieces: [ByteBuffer(bytes: bytes[..<10]), ByteBuffer(bytes: bytes[10..<60]), ByteBuffer(bytes: bytes[60...])])
        #expect(one == three && one.hashValue == three.hashValue)
        #expect(three.byteCount == 100 && three.pieces.count == 3 && one.pieces.count == 1)
        #expect(Array(buffer: three.gathered) == bytes && Array(buffer: one.copied) == bytes)
        #expect(ChanMessage(pieces: []) == ChanMessage(ByteBuffer()) && ChanMessage(pieces: []).byteCount == 0)
        #expect(three != ChanMessage(pieces: [ByteBuffer(bytes: bytes[..<99])]))
    }
}
