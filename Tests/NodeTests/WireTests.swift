import CircuitAPI
import CircuitClient
import CircuitNode
import CircuitTestSupport
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import NIOPosix
import NIOTestUtils
import Synchronization
import Testing

@Suite("The binary protocol's codec")
struct WireCodecTests {
    static let requests: [Wire.Request] = [
        Wire.Request(id: 1, .get(path: "/records/a", stale: false)),
        Wire.Request(id: 2, .get(path: "b/c", stale: true)),
        Wire.Request(id: 3, .put(path: "/records/a", value: Array("hello".utf8), session: 0)),
        Wire.Request(id: 4, .put(path: "/ünïcode", value: [], session: 77)),
        Wire.Request(id: 5, .create(path: "/q/item-", value: [0, 1, 2], session: 9, sequential: true)),
        Wire.Request(id: 6, .create(path: "/lock", value: [0xff], session: 0, sequential: false)),
        Wire.Request(id: 7, .compareAndSet(path: "/a", version: 42, value: Array(repeating: 7, count: 70_000))),
        Wire.Request(id: 8, .delete(path: "/a", version: nil)),
        Wire.Request(id: UInt64.max, .delete(path: "/a", version: 3)),
    ]

    static let answers: [Wire.Answer] = [
        Wire.Answer(
            id: 1,
            .record(Wire.Record(value: Array("v".utf8), version: 3, createRevision: 10, modRevision: 12, session: 0, revision: 99))),
        Wire.Answer(id: 2, .written(WriteView(revision: 100, path: nil, version: 4, session: 0))),
        Wire.Answer(id: 3, .written(WriteView(revision: 101, path: "/records/q/item-0000000007", version: 1, session: 9))),
        Wire.Answer(id: 4, .failed(APIError(status: 409, code: "version_mismatch", message: "/records/a is at version 4, not 3"))),
        Wire.Answer(id: Wire.connectionID, .failed(APIError(status: 413, code: "too_large", message: "a frame of 3 bytes"))),
    ]

    @Test("every request and every answer reads back as it was written, one frame each")
    func roundTrip() throws {
        for request in Self.requests {
            var buffer = ByteBuffer()
            Wire.write(request, to: &buffer)
            let length = buffer.readInteger(as: UInt32.self)
            #expect(length.map { Int($0) } == buffer.readableBytes)
            #expect(try Wire.request(from: buffer) == request)
        }
        for answer in Self.answers {
            var buffer = ByteBuffer()
            Wire.write(answer, to: &buffer)
            _ = buffer.readInteger(as: UInt32.self)
            #expect(try Wire.answer(from: buffer) == answer)
        }
    }

    @Test("a request cut short, with bytes past its end, or of an unknown operation is refused naming what was wrong")
    func malformed() throws {
        var whole = ByteBuffer()
        Wire.write(Wire.Request(id: 5, .put(path: "/records/a", value: Array("hello".utf8), session: 0)), to: &whole)
        whole.moveReaderIndex(forwardBy: 4)
        // Every cut of the frame but the whole is refused, and says what the frame ended before.
        for cut in 0..<whole.readableBytes {
            let short = whole.getSlice(at: whole.readerIndex, length: cut)!
            #expect(throws: Wire.Malformed.self) { try Wire.request(from: short) }
        }
        #expect(throws: Wire.Malformed("the frame ends before the request id")) { try Wire.request(from: ByteBuffer(bytes: [1, 2])) }
        var longer = whole
        longer.writeBytes([0, 0])
        #expect(throws: Wire.Malformed("request 5 has 2 bytes past its last field")) { try Wire.request(from: longer) }
        var unknown = ByteBuffer()
        unknown.writeInteger(UInt64(9))
        unknown.writeInteger(UInt8(77))
        #expect(throws: Wire.Malformed.self) { try Wire.request(from: unknown) }
        do {
            _ = try Wire.request(from: unknown)
        } catch {
            #expect(error.description.contains("unknown operation 77"))
        }
        var lying = ByteBuffer()
        lying.writeInteger(UInt64(3))
        lying.writeInteger(UInt8(1))
        lying.writeInteger(UInt8(0))
        lying.writeInteger(UInt16(500))
        lying.writeString("/a")
        #expect(throws: Wire.Malformed("the path is 500 bytes long but the frame holds 2 more")) { try Wire.request(from: lying) }
    }

    @Test("the frame decoder splits a stream into frames however it is cut, and refuses a length above its limit before the bytes come")
    func frames() throws {
        var input = ByteBuffer()
        var expected: [ByteBuffer] = []
        // The verifier feeds every prefix byte by byte: a few small frames (the 70 KB one would take a minute).
        for request in Self.requests where [1, 3, 5, 8].contains(request.id) {
            var frame = ByteBuffer()
            Wire.write(request, to: &frame)
            input.writeImmutableBuffer(frame)
            expected.append(frame.getSlice(at: 4, length: frame.readableBytes - 4)!)
        }
        try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: [(input, expected)]) { WireFrameDecoder() }

        let channel = EmbeddedChannel(handler: ByteToMessageHandler(WireFrameDecoder(limit: 100)))
        var tooLong = ByteBuffer()
        tooLong.writeInteger(UInt32(101))
        #expect {
            try channel.writeInbound(tooLong)
        } throws: { error in
            (error as? WireFrameDecoder.TooLarge).map { $0.length == 101 && $0.limit == 100 } ?? false
        }
    }
}

/// Reads everything and answers nothing: a node that hangs.
private final class SilentServer: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
}

@Suite("The binary protocol's client")
struct WireClientTests {
    @Test("calls a node never answers fail once the connection's timeout has passed, a write as maybe done and a read as not, each about on time")
    func unansweredCallsTimeOut() async throws {
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(SilentServer()) } }
            .bind(host: "127.0.0.1", port: 0).get()
        defer { server.close(promise: nil) }
        let port = try #require(server.localAddress?.port)
        // 2 s: also the bound on connecting, which a loaded machine could otherwise exceed.
        let connection = try await WireConnection.connect(to: "127.0.0.1:\(port)", tls: nil, timeout: .seconds(2))
        let clock = ContinuousClock()
        let started = clock.now
        async let write: CircuitClientError? = { () async -> CircuitClientError? in
            do throws(CircuitClientError) { _ = try await connection.put("/a", [1]) } catch { return error }
            return nil
        }()
        async let read: CircuitClientError? = { () async -> CircuitClientError? in
            do throws(CircuitClientError) { _ = try await connection.get("/a") } catch { return error }
            return nil
        }()
        let (w, r) = await (write, read)
        let took = started.duration(to: clock.now)
        if case .noAnswer(_, let why)? = w {
            #expect(why.contains("no answer within"), "\(why)")
        } else {
            Issue.record("the write: \(String(describing: w))")
        }
        if case .unreachable? = r {} else { Issue.record("the read: \(String(describing: r))") }
        // Not before the timeout; after it by at most the sweep's period (a tenth of it) and a loaded machine's delay.
        #expect(took >= .seconds(2) && took < .seconds(12), "failed after \(took)")
        // The connection takes calls on (the node may answer late; those answers are dropped).
        let again = clock.now
        await #expect(throws: CircuitClientError.self) { _ = try await connection.get("/b") }
        #expect(again.duration(to: clock.now) >= .seconds(2))
        await connection.close()
    }
}

/// What came back on a raw connection: the answers read, and whether the node closed it.
private final class RawWireCollector: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    let answers = NIOLockedValueBox<[Wire.Answer]>([])
    let closed = NIOLockedValueBox(false)

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if let answer = try? Wire.answer(from: Self.unwrapInboundIn(data)) { answers.withLockedValue { $0.append(answer) } }
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed.withLockedValue { $0 = true }
    }

    /// The node closed its side (the connection allows a half-close, so this comes instead of the end).
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if (event as? ChannelEvent) == .inputClosed { closed.withLockedValue { $0 = true } }
    }
}

/// Writes `bytes` on a fresh connection to `address` and waits until `answers` answers came and, if `closes`, the
/// node closed it.
private func rawWire(
    _ address: String, _ bytes: [UInt8], answers count: Int, closes: Bool, halfClose: Bool = false
) async throws -> (answers: [Wire.Answer], closed: Bool) {
    let parts = address.split(separator: ":")
    let collector = RawWireCollector()
    let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .channelOption(.allowRemoteHalfClosure, value: true)
        .channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(WireFrameDecoder()))
                try channel.pipeline.syncOperations.addHandler(collector)
            }
        }
        .connect(host: String(parts[0]), port: Int(parts[1])!).get()
    if !bytes.isEmpty { try await channel.writeAndFlush(ByteBuffer(bytes: bytes)).get() }
    if halfClose { try await channel.close(mode: .output).get() }
    try await eventually("\(count) answers\(closes ? " and the connection closed" : "") after \(bytes.count) bytes\(halfClose ? " and a half-close" : "")", timeout: .seconds(10)) {
        collector.answers.withLockedValue { $0.count } >= count && (!closes || collector.closed.withLockedValue { $0 })
    }
    let seen = (collector.answers.withLockedValue { $0 }, collector.closed.withLockedValue { $0 })
    try? await channel.close().get()
    return seen
}

/// A put sent again while its outcome is unknown or no leader is known (a leader changing), for up to 30 s.
private func putAcknowledged(_ connection: WireConnection, _ path: String, _ value: [UInt8]) async throws -> WriteView {
    let deadline = ContinuousClock.now + .seconds(30)
    while true {
        do {
            return try await connection.put(path, value)
        } catch {
            let retry: Bool
            switch error {
            case .api(let e): retry = ["outcome_unknown", "no_leader", "refused", "unavailable"].contains(e.code)
            case .noAnswer: retry = true
            default: retry = false
            }
            guard retry, ContinuousClock.now < deadline else { throw error }
            try await Task.sleep(for: .milliseconds(50))
        }
    }
}

private func frame(_ request: Wire.Request) -> [UInt8] {
    var buffer = ByteBuffer()
    Wire.write(request, to: &buffer)
    return Array(buffer.readableBytesView)
}

@Suite("The binary protocol on real daemons", .serialized, .timeLimit(.minutes(3)))
struct WireDaemonTests {
    @Test("records through the wire on any member, beside HTTP on the same port: put, linearizable get, compare-and-set, create, sequential, delete, the API's errors; 1,000 calls in flight on one connection")
    func records() async throws {
        let cluster = try daemons(3)
        defer { cluster.stopAll(signal: SIGKILL) }
        let leader = try await cluster.leader()
        let follower = (leader + 1) % 3, other = (leader + 2) % 3
        let writer = try await WireConnection.connect(to: cluster.members[follower].api, tls: nil)
        let reader = try await WireConnection.connect(to: cluster.members[other].api, tls: nil)

        // A write through a follower is read, linearizably, through the other follower, and by HTTP on the same port.
        let first = try await writer.put("/records/app/config", Array("v1".utf8))
        #expect(first.version == 1)
        let read = try await reader.get("app/config")
        #expect(read.value == Array("v1".utf8) && read.version == 1 && read.modRevision == first.revision)
        #expect(read.revision >= first.revision)
        #expect(try await cluster.client(other).get("/records/app/config").value == "v1")
        #expect(try await reader.get("/records/app/config", stale: true).value == Array("v1".utf8), "applied before the answer above")

        // Compare-and-set and create, with the HTTP API's errors.
        #expect(try await writer.put("/app/config", Array("v2".utf8), version: 1).version == 2)
        #expect(await apiCode { _ = try await writer.put("/app/config", Array("v3".utf8), version: 1) } == "version_mismatch")
        #expect(await apiCode { _ = try await writer.put("/app/config", Array("v3".utf8), version: 0) } == "exists")
        #expect(try await writer.put("/app/lock", [], version: 0).version == 1)
        let queued = try await writer.createSequential("/app/queue/item-", Array("job".utf8))
        #expect(queued.path?.hasPrefix("/records/app/queue/item-") == true, "\(queued)")
        #expect(try await reader.get(try #require(queued.path)).value == Array("job".utf8))
        #expect(await apiCode { _ = try await writer.delete("/app/lock", version: 5) } == "version_mismatch")
        try await writer.delete("/app/lock")
        #expect(await apiCode { _ = try await reader.get("/app/lock") } == "not_found")
        #expect(await apiCode { _ = try await writer.put("/app/bad\u{0}name", []) } == "invalid_name")
        #expect(await apiCode { _ = try await reader.get("/app/../etc") } == "invalid_name")
        // A value over the API's 1 MiB is refused before it is sent, and the connection serves on.
        #expect(await apiCode { _ = try await writer.put("/app/big", Array(repeating: 1, count: (1 << 20) + 1)) } == "too_large")
        #expect(try await writer.put("/app/big", Array(repeating: 1, count: 1 << 18)).version == 1)

        // Many calls in flight on one connection, each answered: 1,000 writes of distinct keys, all applied. (On a
        // loaded machine the leader may change meanwhile: a write whose outcome is unknown is sent again.)
        let revisions = try await withThrowingTaskGroup(of: UInt64.self) { group in
            for i in 0..<1_000 {
                group.addTask { try await putAcknowledged(writer, "/app/many/k\(i)", Array("\(i)".utf8)).revision }
            }
            return try await group.reduce(into: Set<UInt64>()) { $0.insert($1) }
        }
        #expect(revisions.count == 1_000, "every write has its own revision")
        for i in stride(from: 0, to: 1_000, by: 125) {
            #expect(try await reader.get("/app/many/k\(i)").value == Array("\(i)".utf8))
        }

        // A task that prefers the connection's executor makes its calls, and resumes after each, on the thread the
        // connection reads and writes on.
        let loop = writer.taskExecutor.eventLoop
        try await withTaskExecutorPreference(writer.taskExecutor) {
            #expect(loop.inEventLoop)
            let onLoop = try await putAcknowledged(writer, "/app/on-loop", Array("x".utf8))
            #expect(loop.inEventLoop, "resumed on the connection's loop")
            #expect(try await writer.get("/app/on-loop").modRevision == onLoop.revision)
            #expect(loop.inEventLoop)
        }
        #expect(try await cluster.client(leader).list("/records/app/many").names.count == 1_000)
        await writer.close()
        await reader.close()
    }

    @Test("bad input on the wire: a malformed request is refused by id and the connection goes on; a frame too large or an unknown version is refused and the connection closed; a half-closed connection is answered and closed; the daemon serves on")
    func badInput() async throws {
        let cluster = try daemons(1)
        defer { cluster.stopAll(signal: SIGKILL) }
        _ = try await cluster.leader()
        let api = cluster.members[0].api

        // An unknown operation in a sound frame, then a valid write: the first refused, the second done.
        var unknown: [UInt8] = []
        withUnsafeBytes(of: UInt32(9).bigEndian) { unknown += $0 }
        withUnsafeBytes(of: UInt64(41).bigEndian) { unknown += $0 }
        unknown.append(99)
        let goesOn = try await rawWire(
            api, Wire.hello + unknown + frame(Wire.Request(id: 42, .put(path: "/x", value: [1], session: 0))), answers: 2, closes: false)
        let refused = try #require(goesOn.answers.first { $0.id == 41 })
        guard case .failed(let error) = refused.result else { Issue.record("\(refused)"); return }
        #expect(error.code == "bad_request" && error.message.contains("unknown operation 99"), "\(error)")
        guard case .written(let w)? = goesOn.answers.first(where: { $0.id == 42 })?.result else {
            Issue.record("\(goesOn.answers)")
            return
        }
        #expect(w.version == 1)
        #expect(!goesOn.closed)

        // A value over 1 MiB sent anyway is refused by id; a request with id 0 (the connection's own) closes it.
        let bigValue = try await rawWire(
            api, Wire.hello + frame(Wire.Request(id: 7, .put(path: "/y", value: Array(repeating: 2, count: (1 << 20) + 1), session: 0))),
            answers: 1, closes: false)
        guard case .failed(let valueError) = bigValue.answers.first?.result, bigValue.answers.first?.id == 7 else {
            Issue.record("\(bigValue)")
            return
        }
        #expect(valueError.code == "too_large" && valueError.message.contains("\((1 << 20) + 1) bytes"), "\(valueError)")
        let zero = try await rawWire(api, Wire.hello + frame(Wire.Request(id: 0, .get(path: "/x", stale: false))), answers: 1, closes: true)
        guard case .failed(let zeroError) = zero.answers.first?.result, zero.answers.first?.id == Wire.connectionID else {
            Issue.record("\(zero)")
            return
        }
        #expect(zeroError.code == "bad_request" && zeroError.message.contains("id 0"), "\(zeroError)")

        // A frame longer than the limit: the connection is answered as a whole and closed.
        var huge: [UInt8] = []
        withUnsafeBytes(of: UInt32(3 << 20).bigEndian) { huge += $0 }
        let tooLarge = try await rawWire(api, Wire.hello + huge + [1, 2, 3], answers: 1, closes: true)
        guard case .failed(let big) = tooLarge.answers.first?.result, tooLarge.answers.first?.id == Wire.connectionID else {
            Issue.record("\(tooLarge)")
            return
        }
        #expect(big.code == "too_large" && big.message.contains("\(3 << 20) bytes"), "\(big)")

        // Another version of the protocol.
        let future = try await rawWire(api, [0, UInt8(ascii: "C"), UInt8(ascii: "W"), 2], answers: 1, closes: true)
        guard case .failed(let hello) = future.answers.first?.result else {
            Issue.record("\(future)")
            return
        }
        #expect(hello.code == "bad_hello" && hello.message.contains("version 2"), "\(hello)")

        // A client that closes its sending side gets the answers to what it sent, then the end of the connection; one
        // that closes it before sending anything is closed too (not left open until the daemon stops).
        let halfClosed = try await rawWire(
            api, Wire.hello + frame(Wire.Request(id: 5, .get(path: "/x", stale: false))), answers: 1, closes: true, halfClose: true)
        guard case .record(let record) = halfClosed.answers.first?.result else {
            Issue.record("\(halfClosed)")
            return
        }
        #expect(record.value == [1])
        #expect(try await rawWire(api, [], answers: 0, closes: true, halfClose: true).closed)

        // A client gone mid-frame; the daemon serves both protocols on, and kept the write.
        _ = try await rawWire(api, Wire.hello + Array(frame(Wire.Request(id: 1, .get(path: "/x", stale: false))).prefix(9)), answers: 0, closes: false)
        let client = try await WireConnection.connect(to: api, tls: nil)
        #expect(try await client.get("/x").value == [1])
        #expect(try await cluster.client(0).get("/records/x").version == 1)

        // A graceful stop is held neither by a connection that never chose a protocol nor by an idle wire one.
        let parts = api.split(separator: ":")
        let undecided = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(host: String(parts[0]), port: Int(parts[1])!).get()
        let process = try #require(cluster.members[0].process)
        let stopping = ContinuousClock.now
        kill(process.processIdentifier, SIGTERM)
        #expect(DaemonProcesses.waitForExit(process, timeout: .seconds(15)))
        #expect(ContinuousClock.now - stopping < .seconds(4), "the stop took \(ContinuousClock.now - stopping)")
        #expect(await apiCode { _ = try await client.get("/x") } != nil, "the idle wire connection was closed")
        try? await undecided.close().get()
        await client.close()
    }
}
