#if canImport(Glibc)
import Glibc
#endif

/// A bounded buffer between a producer (a process's output streamed from its host) and a reader (FUSE reads): the
/// producer waits while `limit` bytes are unread, the reader while nothing is. Ends with the producer's `finish`, or
/// when the reader `cancel`s (the producer's next `put` answers false).
actor ByteStreamBuffer {
    private var bytes: [UInt8] = []
    private var start = 0
    private var ended = false
    private var failure: FSError?
    private var cancelled = false
    /// Readers waiting for bytes (reads of one file may overlap).
    private var readers: [CheckedContinuation<Void, Never>] = []
    private var writer: CheckedContinuation<Void, Never>?
    let limit: Int

    init(limit: Int = 1 << 20) { self.limit = limit }

    private var unread: Int { bytes.count - start }

    /// Appends `chunk` once there is room; false if the reader has gone.
    func put(_ chunk: [UInt8]) async -> Bool {
        while unread >= limit && !cancelled { await withCheckedContinuation { writer = $0 } }
        if cancelled { return false }
        if start > 0 && start >= bytes.count / 2 {
            bytes.removeFirst(start)
            start = 0
        }
        bytes += chunk
        wakeReader()
        return true
    }

    /// No more bytes will come; `error`, if any, is given to the reader once the bytes before it are read.
    func finish(_ error: FSError?) {
        ended = true
        failure = error
        wakeReader()
    }

    /// Up to `max` bytes, waiting for some; empty at the end. A reader whose task is cancelled (its request was
    /// interrupted) stops waiting with EINTR.
    func take(max: Int) async throws(FSError) -> [UInt8] {
        while unread == 0 && !ended && !cancelled {
            if Task.isCancelled { throw FSError(EINTR, "interrupted") }
            await withTaskCancellationHandler {
                await withCheckedContinuation { readers.append($0) }
            } onCancel: {
                Task { await self.wakeReader() }
            }
        }
        if unread == 0 {
            if let failure { throw failure }
            return []
        }
        let n = Swift.min(max, unread)
        let out = Array(bytes[start..<(start + n)])
        start += n
        if let w = writer {
            writer = nil
            w.resume()
        }
        return out
    }

    /// The reader has gone: the producer stops at its next `put`.
    func cancel() {
        cancelled = true
        wakeReader()
        if let w = writer {
            writer = nil
            w.resume()
        }
    }

    private func wakeReader() {
        let waiting = readers
        readers = []
        for r in waiting { r.resume() }
    }
}
