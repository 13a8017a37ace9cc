import CircuitAPI
import CircuitClient
import CircuitStateMachine
import CircuitTransport
import Foundation
import NIOCore
import NIOEmbedded
import NIOHTTP1

/// What the fuzzers feed bytes to (`circuit-fuzz`, built with `-sanitize=fuzzer` by `scripts/fuzz`), and what the
/// regression tests replay the committed corpus through. Each target takes any bytes and must neither crash nor
/// hang; where an input decodes, it must also survive a round trip. A broken property traps, which the fuzzer
/// reports as a crash with the input that caused it.
public enum FuzzTargets {
    /// The targets by name.
    public static let all: [String: @Sendable ([UInt8]) -> Void] = [
        "command": command, "peer-frame": peerFrame, "http-request": httpRequest, "wire": wire,
    ]

    /// The replicated state machine's command codec, then the state machine itself: the bytes are cut into
    /// entries (a length byte, then that many bytes), each decoded; every command that decodes must encode to
    /// bytes that decode to it again, and is applied to one state, which must then snapshot and restore to the
    /// same bytes. No entry a peer or a corrupt log could hold may crash a replica.
    public static func command(_ bytes: [UInt8]) {
        var state = ControlState(historyLimit: 64)
        var index: UInt64 = 0
        var rest = bytes[...]
        while let length = rest.first {
            rest = rest.dropFirst()
            let entry = Array(rest.prefix(Int(length)))
            rest = rest.dropFirst(Int(length))
            // Most fuzzed entries would fail the format byte; give them the right one so the fuzzer reaches the rest.
            let framed = [Command.formatVersion] + entry
            guard let command = try? Command(decoding: framed) else { continue }
            guard let again = try? Command(decoding: command.encoded), again == command else {
                fatalError("command \(command) does not survive encoding")
            }
            index += 1
            let outcome = state.apply(command, index: index)
            guard (try? CommandResult(decoding: outcome.result.encoded)) == outcome.result else {
                fatalError("result \(outcome.result) does not survive encoding")
            }
        }
        let snapshot = state.snapshot()
        guard let restored = try? ControlState(restoring: snapshot), restored.snapshot() == snapshot else {
            fatalError("the state after \(index) commands does not survive its snapshot")
        }
    }

    /// The peer port's framing and codec: the bytes go through `PeerFrameDecoder` as a peer would send them (in
    /// pieces whose sizes come from the first byte), and every frame decoded must encode to bytes that decode to it
    /// again. A malformed frame is an error (the connection closes), never a crash.
    public static func peerFrame(_ bytes: [UInt8]) {
        feed(bytes, to: PeerFrameDecoder(maxFrameBytes: 1 << 16)) { (frame: PeerFrame) in
            var encoded = ByteBuffer()
            PeerCodec.encode(frame, into: &encoded)
            encoded.moveReaderIndex(forwardBy: 4)  // the length prefix
            guard (try? PeerCodec.decode(payload: &encoded)) == frame else { fatalError("frame \(frame) does not survive encoding") }
        }
    }

    /// Feeds `bytes` after the first to `decoder` in pieces of 1 to 16 bytes (the size from the first byte), as a
    /// peer or client would send them, and hands each frame decoded to `check`; a decoding error ends the feeding.
    private static func feed<Decoder: ByteToMessageDecoder, Frame>(
        _ bytes: [UInt8], to decoder: Decoder, check: (Frame) -> Void
    ) where Decoder.InboundOut == Frame {
        let step = Int(bytes.first ?? 1) % 16 + 1
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(decoder))
        var offset = 1
        while offset < bytes.count, channel.isActive {
            let piece = ByteBuffer(bytes: bytes[offset..<min(bytes.count, offset + step)])
            offset += step
            do { try channel.writeInbound(piece) } catch { break }
            while let frame = try? channel.readInbound(as: Frame.self) { check(frame) }
        }
        _ = try? channel.finish()
    }

    /// The binary protocol for records (`Wire`): the bytes go through `WireFrameDecoder` in pieces (sizes from the
    /// first byte), and each frame is read as a request and as an answer; whatever decodes must encode to the same
    /// frame again. A malformed frame is an error naming what was wrong, never a crash.
    public static func wire(_ bytes: [UInt8]) {
        feed(bytes, to: WireFrameDecoder(limit: 1 << 16)) { (frame: ByteBuffer) in
            if let request = try? Wire.request(from: frame) {
                var encoded = ByteBuffer()
                Wire.write(request, to: &encoded)
                encoded.moveReaderIndex(forwardBy: 4)  // the length prefix
                guard (try? Wire.request(from: encoded)) == request else { fatalError("request \(request) does not survive encoding") }
            }
            if let answer = try? Wire.answer(from: frame) {
                var encoded = ByteBuffer()
                Wire.write(answer, to: &encoded)
                encoded.moveReaderIndex(forwardBy: 4)
                guard (try? Wire.answer(from: encoded)) == answer else { fatalError("answer \(answer) does not survive encoding") }
            }
        }
    }

    /// The HTTP/1.1 request parser the API's server uses (NIOHTTP1's decoder), then the JSON bodies the API reads:
    /// an element (`PUT /v1/namespace/...`, the mount's `run`), a process's command, a transaction, select clauses.
    public static func httpRequest(_ bytes: [UInt8]) {
        let channel = EmbeddedChannel()
        do {
            try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes)))
        } catch { return }
        var body: [UInt8] = []
        do { try channel.writeInbound(ByteBuffer(bytes: bytes)) } catch {}
        while let part = try? channel.readInbound(as: HTTPServerRequestPart.self) {
            switch part {
            case .head(let head): _ = head.uri.split(separator: "?", maxSplits: 1)
            case .body(let buffer): body += buffer.readableBytesView
            case .end: decodeBodies(body)
            }
        }
        _ = try? channel.finish()
        // A body sent without its head: the JSON readers alone.
        decodeBodies(bytes)
    }

    private static func decodeBodies(_ body: [UInt8]) {
        let data = Data(body)
        let decoder = JSONDecoder()
        _ = try? decoder.decode(ElementView.self, from: data)
        _ = try? decoder.decode(ProcCommandView.self, from: data)
        _ = try? decoder.decode(TransactionView.self, from: data)
        _ = try? decoder.decode([SelectClauseView].self, from: data)
        _ = try? decoder.decode([String: [String]].self, from: data)
    }
}
