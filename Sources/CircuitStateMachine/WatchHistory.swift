/// The retained changes that watches resume from, kept encoded (the snapshot's encoding of an event) in chunks rather
/// than as `WatchEvent` values: an event of a 64-byte record costs about 120 bytes instead of about 350 (a value with a
/// path string and a value array of its own on the heap, each with its allocator's overhead). 100,000 retained
/// events hold about 12 MB instead of 35.
///
/// A chunk holds the events of a fixed range of revisions (an eighth of the limit), so it never splits a revision:
/// the oldest chunks are dropped whole and a watcher still resumes at a revision boundary. The ranges depend on
/// nothing but the revisions, so a replica restored from a snapshot drops what one that applied every entry drops,
/// and their states stay identical. Reading decodes only the chunks after the revision asked for.
struct WatchHistory: Sendable {
    private struct Chunk: Sendable {
        var encoded = BinaryWriter()
        var count = 0
        /// Which range of revisions the chunk holds.
        var range: Revision
        var last: Revision = 0
    }

    /// Oldest first.
    private var chunks: [Chunk] = []
    /// Retained events in all chunks.
    private(set) var count = 0
    /// At least this many events are kept (when there are that many).
    let limit: Int
    /// Revisions per chunk: dropping a chunk frees about an eighth of the retained events, so the history holds
    /// between `limit` and about 1.125 × `limit` events.
    private let revisionsPerChunk: Revision

    init(limit: Int) {
        self.limit = max(1, limit)
        self.revisionsPerChunk = Revision(max(1, self.limit / 8))
    }

    /// Adds `event`, the newest. Answers the newest revision dropped to stay near the limit, if any was.
    mutating func append(_ event: WatchEvent) -> Revision? {
        let range = event.revision / revisionsPerChunk
        if chunks.last?.range != range {
            var next = Chunk(range: range)
            if let i = chunks.indices.last {
                let used = chunks[i].encoded.bytes.count
                // Closed: without the room left for growth, if that is more than a quarter of what it holds (up to
                // half, after the array's doublings; little, when the room reserved below was about right). (Copied
                // from a buffer pointer: `Array(bytes[...])` would keep the same storage.)
                if chunks[i].encoded.bytes.capacity > used + used / 4 {
                    chunks[i].encoded.bytes = chunks[i].encoded.bytes.withUnsafeBufferPointer { Array($0) }
                }
                // The next chunk likely holds about as much: room for that at once, rather than doublings of an
                // array of hundreds of kilobytes (each a copy, and a freed block left in the allocator's heap).
                next.encoded.bytes.reserveCapacity(used + used / 8)
            }
            chunks.append(next)
        }
        let i = chunks.count - 1
        event.write(to: &chunks[i].encoded)
        chunks[i].count += 1
        chunks[i].last = event.revision
        count += 1
        var dropped: Revision? = nil
        while chunks.count > 1 && count - chunks[0].count >= limit {
            count -= chunks[0].count
            dropped = chunks[0].last
            chunks.removeFirst()
        }
        return dropped
    }

    /// The bytes of every retained event, as a snapshot holds them.
    var encodedBytes: Int { chunks.reduce(0) { $0 + $1.encoded.bytes.count } }

    /// Writes the count of retained events, then each as `WatchEvent.write(to:)` does: the bytes kept, not decoded
    /// and encoded again.
    func write(to w: inout BinaryWriter) {
        w.int(UInt32(count))
        for chunk in chunks { w.bytes.append(contentsOf: chunk.encoded.bytes) }
    }

    /// Every retained event after `revision` whose path `matches`, oldest first.
    func events(after revision: Revision, matching matches: (String) -> Bool) -> [WatchEvent] {
        var out: [WatchEvent] = []
        for chunk in chunks where chunk.last > revision {
            var reader = BinaryReader(chunk.encoded.bytes)
            for _ in 0..<chunk.count {
                // The bytes were written by `write(to:)` above, in this process: they decode.
                guard let event = try? WatchEvent(from: &reader) else { preconditionFailure("the watch history does not decode") }
                if event.revision > revision && matches(event.path) { out.append(event) }
            }
        }
        return out
    }
}

extension WatchEvent {
    /// The encoding of an event in a snapshot and in the watch history.
    func write(to w: inout BinaryWriter) {
        w.int(revision); w.int(kind.rawValue); w.string(path); w.int(version); w.bool(element != nil)
        element?.write(to: &w)
    }

    init(from r: inout BinaryReader) throws(ControlError) {
        let revision: Revision = try r.int("event revision")
        let kind = WatchEvent.Kind(rawValue: try r.int("event kind")) ?? .put
        let path = try r.string("event path")
        let version: UInt64 = try r.int("event version")
        let element = try r.bool("event has element") ? try Element(from: &r) : nil
        self.init(revision: revision, kind: kind, path: path, version: version, element: element)
    }
}
