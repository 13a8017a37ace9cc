import CircuitAPI
import NIOCore

/// Circuit's binary protocol for records (docs/wire-protocol.md): what the HTTP/JSON API's `/v1/records` does, in
/// length-prefixed binary frames on one long-lived connection, with many requests in flight at once and answered as
/// each is done. It is spoken on the API's own port: a connection that opens with `Wire.hello` speaks it, any other
/// (HTTP, or TLS then HTTP) is the HTTP API.
///
/// Every frame is a 4-byte big-endian length and that many bytes. A request: its id (8 bytes, the client's choice;
/// echoed in the answer), an operation (1 byte), then the operation's fields. An answer: the id, a kind (1 byte), then
/// the kind's fields. Integers are big-endian; a string is a 2-byte length and UTF-8; a value is a 4-byte length and
/// its bytes. A pure codec: the I/O is the caller's.
public enum Wire {
    /// The four bytes a client sends first: a NUL (which begins no HTTP request and no TLS record), "CW" and the
    /// protocol's version.
    public static let hello: [UInt8] = [0, UInt8(ascii: "C"), UInt8(ascii: "W"), version]
    public static let version: UInt8 = 1
    /// The largest value, as the HTTP API's body.
    public static let maxValue = 1 << 20
    /// The longest path a client sends: a name is at most 1,024 bytes, and `/records` may be prefixed to it.
    public static let maxPath = 1024 + 8
    /// The largest frame either side accepts (its bytes after the length): a value of `maxValue` with room for a path
    /// and the rest.
    public static let maxFrame = maxValue + (1 << 16)
    /// The id of an answer that belongs to no request: the connection is unusable (a frame too large, a bad hello, no
    /// certificate) and the node closes it after this answer.
    public static let connectionID: UInt64 = 0

    /// What a frame that cannot be read was missing or had wrong.
    public struct Malformed: Error, Sendable, Equatable, CustomStringConvertible {
        public var description: String
        public init(_ description: String) { self.description = description }
    }

    /// One request: `id` is echoed in its answer.
    public struct Request: Sendable, Equatable {
        public var id: UInt64
        public var operation: Operation

        public init(id: UInt64, _ operation: Operation) {
            self.id = id
            self.operation = operation
        }
    }

    /// The operations on records, as the HTTP API's. Paths are full (`/records/a/b`) or relative to `/records`.
    public enum Operation: Sendable, Equatable {
        /// A read: linearizable unless `stale`.
        case get(path: String, stale: Bool)
        /// Sets a record (creating it if absent), tied to `session` unless 0.
        case put(path: String, value: [UInt8], session: UInt64)
        /// Creates a record that must not exist; `sequential`: `path` is a prefix, followed by the parent's next
        /// sequence number (the answer names the record made).
        case create(path: String, value: [UInt8], session: UInt64, sequential: Bool)
        /// Sets a record only if it is at `version`.
        case compareAndSet(path: String, version: UInt64, value: [UInt8])
        /// Removes a record, only if it is at `version` unless that is nil.
        case delete(path: String, version: UInt64?)

        fileprivate var code: UInt8 {
            switch self {
            case .get: 1
            case .put: 2
            case .create: 3
            case .compareAndSet: 4
            case .delete: 5
            }
        }

        /// The record's path (or a sequential create's prefix).
        public var path: String {
            switch self {
            case .get(let path, _), .put(let path, _, _), .create(let path, _, _, _), .compareAndSet(let path, _, _), .delete(let path, _): path
            }
        }

        /// The bytes of its value, if it carries one.
        public var valueSize: Int? {
            switch self {
            case .put(_, let value, _), .create(_, let value, _, _), .compareAndSet(_, _, let value): value.count
            case .get, .delete: nil
            }
        }

        /// Whether it changes the state (the `write` role) or reads it (`read`).
        public var isWrite: Bool {
            if case .get = self { return false }
            return true
        }
    }

    /// A record as read, with the cluster's revision when it was read.
    public struct Record: Sendable, Equatable {
        public var value: [UInt8]
        public var version: UInt64
        public var createRevision: UInt64
        public var modRevision: UInt64
        /// The session it is tied to (0: durable).
        public var session: UInt64
        public var revision: UInt64

        public init(value: [UInt8], version: UInt64, createRevision: UInt64, modRevision: UInt64, session: UInt64, revision: UInt64) {
            self.value = value
            self.version = version
            self.createRevision = createRevision
            self.modRevision = modRevision
            self.session = session
            self.revision = revision
        }
    }

    /// The answer to one request (`id`), or to the connection (`connectionID`).
    public struct Answer: Sendable, Equatable {
        public var id: UInt64
        public var result: Result

        public init(id: UInt64, _ result: Result) {
            self.id = id
            self.result = result
        }
    }

    public enum Result: Sendable, Equatable {
        case record(Record)
        case written(WriteView)
        /// The error the HTTP API would answer: its status, code and message.
        case failed(APIError)
    }

    // MARK: - Encoding

    /// Appends `request` as one frame.
    public static func write(_ request: Request, to buffer: inout ByteBuffer) {
        frame(&buffer) { b in
            b.writeInteger(request.id)
            b.writeInteger(request.operation.code)
            switch request.operation {
            case .get(let path, let stale):
                b.writeInteger(UInt8(stale ? 1 : 0))
                writeString(path, to: &b)
            case .put(let path, let value, let session):
                b.writeInteger(session)
                writeString(path, to: &b)
                writeValue(value, to: &b)
            case .create(let path, let value, let session, let sequential):
                b.writeInteger(session)
                b.writeInteger(UInt8(sequential ? 1 : 0))
                writeString(path, to: &b)
                writeValue(value, to: &b)
            case .compareAndSet(let path, let version, let value):
                b.writeInteger(version)
                writeString(path, to: &b)
                writeValue(value, to: &b)
            case .delete(let path, let version):
                b.writeInteger(UInt8(version == nil ? 0 : 1))
                b.writeInteger(version ?? 0)
                writeString(path, to: &b)
            }
        }
    }

    /// Appends `answer` as one frame.
    public static func write(_ answer: Answer, to buffer: inout ByteBuffer) {
        frame(&buffer) { b in
            b.writeInteger(answer.id)
            switch answer.result {
            case .record(let r):
                b.writeInteger(UInt8(1))
                b.writeMultipleIntegers(r.version, r.createRevision, r.modRevision, r.session, r.revision)
                writeValue(r.value, to: &b)
            case .written(let w):
                b.writeInteger(UInt8(2))
                b.writeMultipleIntegers(w.revision, w.version, w.session)
                b.writeInteger(UInt8(w.path == nil ? 0 : 1))
                writeString(w.path ?? "", to: &b)
            case .failed(let e):
                b.writeInteger(UInt8(3))
                b.writeInteger(UInt16(clamping: e.statusCode))
                writeString(e.code, to: &b)
                writeString(e.message, to: &b)
            }
        }
    }

    private static func frame(_ buffer: inout ByteBuffer, _ body: (inout ByteBuffer) -> Void) {
        let start = buffer.writerIndex
        buffer.writeInteger(UInt32(0))  // the length, set below
        body(&buffer)
        buffer.setInteger(UInt32(buffer.writerIndex - start - 4), at: start)
    }

    private static func writeString(_ s: String, to buffer: inout ByteBuffer) {
        let start = buffer.writerIndex
        buffer.writeInteger(UInt16(0))  // the length, set below
        // A longer string is cut at the limit (a path is refused long before; a message is ours).
        let written = buffer.writeString(s)
        if written > Int(UInt16.max) { buffer.moveWriterIndex(to: start + 2 + Int(UInt16.max)) }
        buffer.setInteger(UInt16(min(written, Int(UInt16.max))), at: start)
    }

    private static func writeValue(_ value: [UInt8], to buffer: inout ByteBuffer) {
        buffer.writeInteger(UInt32(value.count))
        buffer.writeBytes(value)
    }

    // MARK: - Decoding

    /// Reads a request from one frame's bytes (without its length).
    public static func request(from frame: ByteBuffer) throws(Malformed) -> Request {
        var b = frame
        let id: UInt64 = try integer(&b, "the request id")
        let code: UInt8 = try integer(&b, "the operation")
        let operation: Operation
        switch code {
        case 1:
            let stale: UInt8 = try integer(&b, "the consistency")
            operation = .get(path: try string(&b, "the path"), stale: stale != 0)
        case 2:
            let session: UInt64 = try integer(&b, "the session")
            operation = .put(path: try string(&b, "the path"), value: try value(&b), session: session)
        case 3:
            let session: UInt64 = try integer(&b, "the session")
            let sequential: UInt8 = try integer(&b, "the sequential flag")
            operation = .create(path: try string(&b, "the path"), value: try value(&b), session: session, sequential: sequential != 0)
        case 4:
            let version: UInt64 = try integer(&b, "the version")
            operation = .compareAndSet(path: try string(&b, "the path"), version: version, value: try value(&b))
        case 5:
            let has: UInt8 = try integer(&b, "the version flag")
            let version: UInt64 = try integer(&b, "the version")
            operation = .delete(path: try string(&b, "the path"), version: has == 0 ? nil : version)
        default:
            throw Malformed("request \(id) has an unknown operation \(code) (1 get, 2 put, 3 create, 4 compare-and-set, 5 delete)")
        }
        guard b.readableBytes == 0 else { throw Malformed("request \(id) has \(b.readableBytes) bytes past its last field") }
        return Request(id: id, operation)
    }

    /// Reads an answer from one frame's bytes (without its length).
    public static func answer(from frame: ByteBuffer) throws(Malformed) -> Answer {
        var b = frame
        let id: UInt64 = try integer(&b, "the request id")
        let kind: UInt8 = try integer(&b, "the answer's kind")
        let result: Result
        switch kind {
        case 1:
            guard let (version, created, modified, session, revision) = b.readMultipleIntegers(as: (UInt64, UInt64, UInt64, UInt64, UInt64).self)
            else { throw Malformed("the frame ends before the record's numbers") }
            result = .record(
                Record(value: try value(&b), version: version, createRevision: created, modRevision: modified, session: session, revision: revision))
        case 2:
            guard let (revision, version, session) = b.readMultipleIntegers(as: (UInt64, UInt64, UInt64).self) else {
                throw Malformed("the frame ends before the write's numbers")
            }
            let named: UInt8 = try integer(&b, "the path flag")
            let path = try string(&b, "the path")
            result = .written(WriteView(revision: revision, path: named == 0 ? nil : path, version: version, session: session))
        case 3:
            let status: UInt16 = try integer(&b, "the status")
            let code = try string(&b, "the error code")
            result = .failed(APIError(status: Int(status), code: code, message: try string(&b, "the error message")))
        default:
            throw Malformed("answer \(id) has an unknown kind \(kind)")
        }
        guard b.readableBytes == 0 else { throw Malformed("answer \(id) has \(b.readableBytes) bytes past its last field") }
        return Answer(id: id, result)
    }

    // What is missing is named only when something is (these run for every frame: no string is put together
    // otherwise).
    private static func integer<T: FixedWidthInteger>(_ b: inout ByteBuffer, _ what: @autoclosure () -> String) throws(Malformed) -> T {
        guard let n = b.readInteger(as: T.self) else { throw Malformed("the frame ends before \(what())") }
        return n
    }

    private static func string(_ b: inout ByteBuffer, _ what: String) throws(Malformed) -> String {
        let length: UInt16 = try integer(&b, "the length of \(what)")
        guard let s = b.readString(length: Int(length)) else {
            throw Malformed("\(what) is \(length) bytes long but the frame holds \(b.readableBytes) more")
        }
        return s
    }

    private static func value(_ b: inout ByteBuffer) throws(Malformed) -> [UInt8] {
        let length: UInt32 = try integer(&b, "the value's length")
        guard let bytes = b.readBytes(length: Int(length)) else {
            throw Malformed("the value is \(length) bytes long but the frame holds \(b.readableBytes) more")
        }
        return bytes
    }
}

/// Splits a byte stream into the protocol's frames (each without its length), refusing a length above `limit`
/// before its bytes are waited for.
public struct WireFrameDecoder: ByteToMessageDecoder {
    public typealias InboundOut = ByteBuffer

    /// A frame's length above the limit: the stream cannot be read on (its bytes would have to be skipped unread).
    public struct TooLarge: Error, Sendable, Equatable, CustomStringConvertible {
        public var length: Int
        public var limit: Int
        public var description: String { "a frame of \(length) bytes is larger than the limit of \(limit)" }
    }

    public let limit: Int

    public init(limit: Int = Wire.maxFrame) {
        self.limit = limit
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return .needMoreData }
        guard Int(length) <= limit else { throw TooLarge(length: Int(length), limit: limit) }
        guard buffer.readableBytes >= 4 + Int(length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: 4)
        context.fireChannelRead(wrapInboundOut(buffer.readSlice(length: Int(length))!))
        return .continue
    }
}
