import CircuitAPI
import Hummingbird
import NIOCore

/// The answers of the hottest routes (a record read, a write's outcome) written as JSON by hand, straight into the
/// response's buffer: the object `JSONEncoder` with sorted keys writes (nil fields left out, `/` not escaped), at a
/// fraction of its cost. `JSONEncoder` was about a sixteenth of a daemon's time under 64 clients' reads.
struct JSONObjectWriter {
    private var buffer: ByteBuffer
    private var first = true

    init(capacity: Int) {
        buffer = ByteBuffer()
        buffer.reserveCapacity(capacity)
        buffer.writeInteger(UInt8(ascii: "{"))
    }

    /// Fields must come in sorted order of their names, as `JSONEncoder`'s `.sortedKeys` writes them.
    mutating func field(_ name: StaticString, _ value: UInt64) {
        key(name)
        buffer.writeString(String(value))
    }

    /// A nil value writes nothing, as `JSONEncoder` leaves out a nil optional.
    mutating func field(_ name: StaticString, _ value: String?) {
        guard let value else { return }
        key(name)
        string(value)
    }

    mutating func finish() -> ByteBuffer {
        buffer.writeInteger(UInt8(ascii: "}"))
        return buffer
    }

    private mutating func key(_ name: StaticString) {
        if !first { buffer.writeInteger(UInt8(ascii: ",")) }
        first = false
        buffer.writeInteger(UInt8(ascii: "\""))
        buffer.writeStaticString(name)
        buffer.writeStaticString("\":")
    }

    /// A JSON string: `"` and `\` escaped, control characters as `\n`, `\t` and the like or `\u00XX`; everything
    /// else as its UTF-8 bytes.
    private mutating func string(_ text: String) {
        buffer.writeInteger(UInt8(ascii: "\""))
        var text = text
        text.withUTF8 { bytes in
            var plain = 0
            for i in bytes.indices {
                let b = bytes[i]
                guard b < 0x20 || b == UInt8(ascii: "\"") || b == UInt8(ascii: "\\") else { continue }
                buffer.writeBytes(UnsafeRawBufferPointer(UnsafeBufferPointer(rebasing: bytes[plain..<i])))
                escape(b)
                plain = i + 1
            }
            buffer.writeBytes(UnsafeRawBufferPointer(UnsafeBufferPointer(rebasing: bytes[plain...])))
        }
        buffer.writeInteger(UInt8(ascii: "\""))
    }

    private static let hex: [UInt8] = Array("0123456789abcdef".utf8)

    private mutating func escape(_ b: UInt8) {
        switch b {
        case UInt8(ascii: "\""): buffer.writeStaticString("\\\"")
        case UInt8(ascii: "\\"): buffer.writeStaticString("\\\\")
        case 0x0A: buffer.writeStaticString("\\n")
        case 0x0D: buffer.writeStaticString("\\r")
        case 0x09: buffer.writeStaticString("\\t")
        case 0x08: buffer.writeStaticString("\\b")
        case 0x0C: buffer.writeStaticString("\\f")
        default:
            buffer.writeStaticString("\\u00")
            buffer.writeInteger(Self.hex[Int(b >> 4)])
            buffer.writeInteger(Self.hex[Int(b & 0xF)])
        }
    }
}

/// A view whose JSON is written by hand (see `JSONObjectWriter`): `json(_:)` answers it so rather than through
/// `JSONEncoder`, with the same bytes.
protocol HandWrittenJSON: Encodable {
    var jsonBuffer: ByteBuffer { get }
}

extension RecordView: HandWrittenJSON {
    var jsonBuffer: ByteBuffer {
        var w = JSONObjectWriter(capacity: 160 + path.utf8.count + value.utf8.count + valueBase64.utf8.count)
        // The names of `RecordView.CodingKeys`, sorted.
        w.field("create_revision", createRevision)
        w.field("mod_revision", modRevision)
        w.field("path", path)
        w.field("revision", revision)
        w.field("session", session)
        w.field("value", value)
        w.field("value_base64", valueBase64)
        w.field("version", version)
        return w.finish()
    }
}

extension WriteView: HandWrittenJSON {
    var jsonBuffer: ByteBuffer {
        var w = JSONObjectWriter(capacity: 96 + (path?.utf8.count ?? 0))
        w.field("path", path)
        w.field("revision", revision)
        w.field("session", session)
        w.field("version", version)
        return w.finish()
    }
}

/// The answer of a view written by hand. Throws nothing; declared `throws` as the `Encodable` one is, so that every
/// route calls `try json(...)` alike.
func json(_ view: some HandWrittenJSON) throws -> Response { jsonResponse(view.jsonBuffer) }
