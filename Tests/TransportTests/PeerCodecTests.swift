import CircuitRaft
import NIOCore
import NIOEmbedded
import NIOTestUtils
import Testing

@testable import CircuitTransport

private let membership = Membership(voters: [1, 2, 3], learners: [9])
private let snapshot = SnapshotMetadata(index: 77, term: 5, membership: membership)

/// One frame of every kind, with every field set.
let sampleFrames: [PeerFrame] = [
    .hello(version: 1, clusterID: 0xDEAD_BEEF_0000_0001, hostID: 42),
    .welcome(hostID: 7),
    .refused(reason: "cluster id 2, this node belongs to 1"),
    .raft([]),
    .raft(
        Message.Kind.allCases.map { kind in
            Message(
                kind: kind, from: 1, to: 2, term: 9, logTerm: 8, index: 100, entries: kind == .append ? [
                    Entry(term: 8, index: 101, kind: .normal, data: Array("hello".utf8)),
                    Entry(term: 9, index: 102, kind: .noop),
                    Entry(term: 9, index: 103, kind: .config, data: membership.encoded),
                ] : [], commit: 99, reject: kind == .appendResponse, rejectHint: 50, context: 3,
                snapshot: kind == .snapshot ? snapshot : nil)
        }),
    .snapshotChunk(
        SnapshotChunk(kind: .data, from: 1, to: 3, term: 9, snapshot: snapshot, offset: 1 << 20, data: [1, 2, 3], last: true)),
    .snapshotChunk(SnapshotChunk(kind: .ack, from: 3, to: 1, term: 9, snapshot: snapshot, offset: 12345)),
]

private func encoded(_ frame: PeerFrame) -> ByteBuffer {
    var buffer = ByteBuffer()
    PeerCodec.encode(frame, into: &buffer)
    return buffer
}

@Suite("Peer wire codec")
struct PeerCodecTests {
    @Test("every frame kind round-trips through the codec", arguments: sampleFrames)
    func roundTrip(frame: PeerFrame) throws {
        var buffer = encoded(frame)
        let length = buffer.readInteger(as: UInt32.self)
        #expect(length.map(Int.init) == buffer.readableBytes)
        #expect(try PeerCodec.decode(payload: &buffer) == frame)
    }

    @Test("the frame decoder survives every split of the stream (ByteToMessageDecoderVerifier)")
    func decoderVerifier() throws {
        try ByteToMessageDecoderVerifier.verifyDecoder(
            inputOutputPairs: sampleFrames.map { (encoded($0), [$0]) },
            decoderFactory: { PeerFrameDecoder(maxFrameBytes: 1 << 20) })
    }

    @Test("an oversized frame is refused from its length alone, before it is buffered")
    func oversized() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(PeerFrameDecoder(maxFrameBytes: 100)))
        var buffer = ByteBuffer()
        buffer.writeInteger(UInt32(1_000_000))
        buffer.writeInteger(UInt8(4))
        #expect(throws: PeerWireError.frameTooLarge(size: 1_000_000, limit: 100)) { try channel.writeInbound(buffer) }
    }

    @Test(
        "malformed payloads are refused with an error naming what is wrong",
        arguments: [
            ([99], PeerWireError.unknownFrameType(99)),
            ([2, 0, 0], PeerWireError.truncated(field: "host id")),
            ([4, 0, 0, 0, 1, 77], PeerWireError.unknownMessageKind(77)),
            ([4, 0xFF, 0xFF, 0xFF, 0xFF], PeerWireError.invalid("4294967295 messages claimed in 0 bytes")),
            ([2, 0, 0, 0, 0, 0, 0, 0, 7, 0], PeerWireError.invalid("1 bytes after the frame's fields")),
        ] as [([UInt8], PeerWireError)])
    func malformed(bytes: [UInt8], error: PeerWireError) {
        var buffer = ByteBuffer(bytes: bytes)
        #expect(throws: error) { try PeerCodec.decode(payload: &buffer) }
        #expect(!error.description.isEmpty)
    }
}
