import CircuitAPI
import CircuitTestSupport
import Foundation
import Hummingbird
import NIOCore
import NIOPosix
import Synchronization
import Testing
@testable import CircuitNode

/// A pipe's size as the kernel has it.
private func pipeBytes(_ fd: CInt) -> Int { Int(fcntl(fd, PipeSize.get)) }

private func write(_ bytes: [UInt8], to fd: CInt) throws {
    var offset = 0
    while offset < bytes.count {
        let n = bytes[offset...].withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        try #require(n > 0, "write to the pipe: errno \(errno)")
        offset += n
    }
}

private func makePipe() throws -> (read: CInt, write: CInt) {
    var pair: [CInt] = [-1, -1]
    try #require(pipe(&pair) == 0)
    return (pair[0], pair[1])
}

/// A `ProcOutput` on a new pipe (budget unlimited) and the pipe's write end, which the test holds as a child would.
private func makeOutput() throws -> (output: ProcOutput, writeEnd: CInt) {
    let (readEnd, writeEnd) = try makePipe()
    return (ProcOutput(fd: readEnd, budget: PipeBudget(limit: .max)), writeEnd)
}

/// A process's output and input streams on the host, over real pipes whose other ends the test holds (as a child
/// would).
@Suite("ProcOutput and ProcInput: a process's streams as its host holds them", .timeLimit(.minutes(1)))
struct ProcOutputTests {
    /// Reads until `count` bytes came (or the stream ended), and the chunks they came in.
    static func read(_ output: ProcOutput, count: Int) async -> [ByteBuffer] {
        var chunks: [ByteBuffer] = []
        var total = 0
        while total < count, let next = await output.next() {
            chunks += next
            total += next.reduce(0) { $0 + $1.readableBytes }
        }
        return chunks
    }

    static func text(_ chunks: [ByteBuffer]) -> String { String(decoding: chunks.flatMap { Array($0.readableBytesView) }, as: UTF8.self) }

    @Test("a writer of stdin makes its pipe larger while it writes; kept open, the pipe goes back to its size; closed, the child sees the end")
    func stdinPipeGrowsWhileWritten() async throws {
        let (readEnd, writeEnd) = try makePipe()
        defer { close(readEnd) }
        let original = pipeBytes(readEnd)
        let input = ProcInput(fd: writeEnd, budget: PipeBudget(limit: .max))
        try input.acquire()
        try await eventually("the pipe is \(PipeSizer.large) bytes while written") { pipeBytes(readEnd) == PipeSizer.large }
        try await input.write(ByteBuffer(string: "hello"))
        input.finish(keepOpen: true)
        try await eventually("the pipe is back to its size (what it holds fits)") { pipeBytes(readEnd) == original }
        try input.acquire()
        try await input.write(ByteBuffer(string: ", world"))
        input.finish(keepOpen: false)
        var read: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 64)
        while case let n = buffer.withUnsafeMutableBytes({ Glibc.read(readEnd, $0.baseAddress, $0.count) }), n > 0 {
            read += buffer[..<n]
        }
        #expect(String(decoding: read, as: UTF8.self) == "hello, world", "both writes, then the end of the stream")
    }

    @Test("a write waiting for a full pipe ends when its client's connection closes; the bytes stay queued, ahead of the next writer's")
    func writerGoneWhileThePipeIsFull() async throws {
        let (readEnd, writeEnd) = try makePipe()
        defer { close(readEnd) }
        let input = ProcInput(fd: writeEnd, budget: PipeBudget(limit: .max))
        try input.acquire()
        // The client's connection: any channel will do (a pipe's, here), open, then closed.
        let client = try await PipeSizerTests.channel()
        defer { close(client.writeEnd) }
        // Twice the pipe: nobody reads, so the write cannot end by itself.
        let flood = ByteBuffer(repeating: 1, count: 2 * PipeSizer.large)
        let blocked = Task { try await input.write(flood, unlessGone: client.channel) }
        try await client.channel.close()
        await #expect(throws: ProcInput.WriterGone.self) { try await blocked.value }
        input.finish(keepOpen: true)
        try input.acquire()
        let next = Task { try await input.write(ByteBuffer(string: "after")) }
        // Drained by a reader, the pipe gives the flood, then the next writer's bytes.
        var read: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while read.count < flood.readableBytes + 5,
            case let n = buffer.withUnsafeMutableBytes({ Glibc.read(readEnd, $0.baseAddress, $0.count) }), n > 0
        {
            read += buffer[..<n]
        }
        try await next.value
        input.finish(keepOpen: false)
        #expect(read.count == flood.readableBytes + 5)
        #expect(read.prefix(flood.readableBytes).allSatisfy { $0 == 1 } && String(decoding: read.suffix(5), as: UTF8.self) == "after")
    }

    @Test("a reader makes the pipe larger while it holds the stream; the pipe goes back to its size when it leaves")
    func pipeGrowsWhileRead() async throws {
        let (output, writeEnd) = try makeOutput()
        defer { close(writeEnd); output.close() }
        let original = pipeBytes(writeEnd)
        #expect(output.acquire())
        try await eventually("the pipe is \(PipeSizer.large) bytes while read") { pipeBytes(writeEnd) == PipeSizer.large }
        #expect(!output.acquire(), "one reader at a time")
        output.release()
        try await eventually("the pipe is back to its size") { pipeBytes(writeEnd) == original }
    }

    @Test("a MiB comes in large reads, in order; chunks held while nobody reads are copies, not reads' large buffers")
    func largeReadsAndCompactChunks() async throws {
        let (output, writeEnd) = try makeOutput()
        defer { close(writeEnd); output.close() }
        #expect(output.acquire())
        try await eventually("the pipe is larger") { pipeBytes(writeEnd) == PipeSizer.large }

        let large = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        try write(large, to: writeEnd)
        let chunks = await Self.read(output, count: large.count)
        #expect(chunks.flatMap { Array($0.readableBytesView) } == large, "every byte, in order")
        #expect(chunks.contains { $0.readableBytes > 64 << 10 }, "reads larger than NIO's default of 64 KiB")

        // The reads have grown to large buffers. Read while the reader holds the stream, a small chunk is its read's
        // buffer; left behind by the reader, it is copied.
        try write(Array("0123456789".utf8), to: writeEnd)
        try await eventually("ten bytes read from the pipe") { output.heldBytes == 10 }
        output.release()
        #expect(output.acquire())
        let left = await Self.read(output, count: 10)
        #expect(Self.text(left) == "0123456789")
        #expect(!left.contains(where: ProcOutput.wasteful), "compact after the reader left (capacities \(left.map(\.capacity)))")
        output.release()

        // Read while nobody holds the stream: copied as it comes.
        try write(Array("abcdefghij".utf8), to: writeEnd)
        try await eventually("ten bytes more read from the pipe") { output.heldBytes == 10 }
        #expect(output.acquire())
        let idle = await Self.read(output, count: 10)
        #expect(Self.text(idle) == "abcdefghij")
        #expect(!idle.contains(where: ProcOutput.wasteful), "compact as it came (capacities \(idle.map(\.capacity)))")
        output.release()
    }

    @Test("chunks a reader could not pass on are read again first, in their order")
    func unreadKeepsOrder() async throws {
        let (output, writeEnd) = try makeOutput()
        defer { close(writeEnd); output.close() }
        #expect(output.acquire())
        try write(Array("tail".utf8), to: writeEnd)
        let tail = await Self.read(output, count: 4)
        output.unread([ByteBuffer(string: "one "), ByteBuffer(string: "two ")] + tail)
        #expect(Self.text(await Self.read(output, count: 12)) == "one two tail")
        output.release()
    }

    @Test("a read's answer holds the stream until its body ends, and gives it back if the body is dropped unwritten (the client went away before the head went out)")
    func droppedBodyGivesTheStreamBack() async throws {
        let (output, writeEnd) = try makeOutput()
        defer { close(writeEnd); output.close() }
        var body: ResponseBody? = try StdioRoutes.reading(output, until: RequestBody(buffer: ByteBuffer()), path: "/X1/p", stream: "stdout")
        #expect(body != nil)
        #expect(!output.acquire(), "held by the answer not yet written")
        #expect(throws: APIError.self) { try StdioRoutes.reading(output, until: RequestBody(buffer: ByteBuffer()), path: "/X1/p", stream: "stdout") }
        body = nil
        #expect(output.acquire(), "the dropped answer gave it back")
        output.release()
    }

    @Test("the stream ends once the writer closes and all was read")
    func endsWithTheWriter() async throws {
        let (output, writeEnd) = try makeOutput()
        defer { output.close() }
        #expect(output.acquire())
        try write(Array("last words".utf8), to: writeEnd)
        close(writeEnd)
        #expect(Self.text(await Self.read(output, count: .max)) == "last words")
        #expect(await output.next() == nil)
        output.release()
    }
}

/// The pipe sizes alone, on pipes read by NIO channels that read only when asked.
@Suite("PipeSizer: streamed pipes are large, within a budget")
struct PipeSizerTests {
    /// A pipe whose read end is a NIO channel that reads only when asked.
    static func channel() async throws -> (channel: any Channel, fd: CInt, writeEnd: CInt) {
        let (readEnd, writeEnd) = try makePipe()
        let channel = try await NIOPipeBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelOption(.autoRead, value: false)
            .takingOwnershipOfDescriptor(input: readEnd).get()
        return (channel, readEnd, writeEnd)
    }

    /// Waits until the tasks queued on the channel's loop so far (the sizer's) have run.
    static func settled(_ channel: any Channel) async throws {
        try await channel.eventLoop.submit {}.get()
    }

    @Test("no more pipes are large at once than the budget allows; one given back lets another grow")
    func budget() async throws {
        let budget = PipeBudget(limit: 1)
        let (a, aFD, aWrite) = try await Self.channel()
        let (b, bFD, bWrite) = try await Self.channel()
        defer { _ = a.close(); _ = b.close(); close(aWrite); close(bWrite) }
        let original = pipeBytes(aWrite)
        let aSizer = PipeSizer(fd: aFD, channel: a.eventLoop.makeSucceededFuture(a), budget: budget)
        let bSizer = PipeSizer(fd: bFD, channel: b.eventLoop.makeSucceededFuture(b), budget: budget)

        aSizer.streaming(true)
        try await Self.settled(a)
        bSizer.streaming(true)
        try await Self.settled(b)
        #expect(pipeBytes(aWrite) == PipeSizer.large && pipeBytes(bWrite) == original, "the first takes the budget")
        #expect(budget.inUse == 1)

        aSizer.streaming(false)
        try await Self.settled(a)
        #expect(pipeBytes(aWrite) == original && budget.inUse == 0, "given back")
        bSizer.streaming(true)
        try await Self.settled(b)
        #expect(pipeBytes(bWrite) == PipeSizer.large && budget.inUse == 1, "the other grows once asked again")

        b.close(promise: nil)
        try await b.closeFuture.get()
        try await eventually("a closed large pipe gives its share back") { budget.inUse == 0 }
    }

    @Test("a pipe that holds more than its own size stays large until it has drained, then shrinks")
    func shrinkWaitsForDrain() async throws {
        let budget = PipeBudget(limit: 1)
        let (channel, fd, writeEnd) = try await Self.channel()
        defer { _ = channel.close(); close(writeEnd) }
        let original = pipeBytes(writeEnd)
        let sizer = PipeSizer(fd: fd, channel: channel.eventLoop.makeSucceededFuture(channel), budget: budget, retryEvery: .milliseconds(20))
        sizer.streaming(true)
        try await Self.settled(channel)
        #expect(pipeBytes(writeEnd) == PipeSizer.large)

        try write([UInt8](repeating: 7, count: original * 3), to: writeEnd)
        sizer.streaming(false)
        try await Self.settled(channel)
        #expect(pipeBytes(writeEnd) == PipeSizer.large && budget.inUse == 1, "the kernel refuses to shrink a pipe below what it holds")

        // Drained (the channel reads when asked, and nothing keeps what it reads), it shrinks on a retry.
        try await eventually("drained and shrunk") {
            channel.read()
            return pipeBytes(writeEnd) == original
        }
        #expect(budget.inUse == 0)
    }
}
