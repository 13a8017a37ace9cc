import CircuitAPI
import CircuitClient
import Foundation

/// One open file of the mount. What it does depends on the file:
/// - a file read whole (help, stat, waitexit, recv, wait, a record, ...): its content is made at the first read
///   (which may block, as `waitexit` does) and later reads take it by offset;
/// - a file written whole (run, send, cap, select, signal, a record, ...): writes collect, and `flush` (every close of
///   the file) hands what was written to the cluster; its failure is close's errno;
/// - stdin: each write goes to the process at once; closing the file after a write closes the process's stdin;
/// - stdout and stderr: read as a stream from the process's host, with back-pressure.
actor OpenFile {
    let node: FSNode
    let fs: CircuitFileSystem
    private var content: Task<[UInt8], any Error>?
    private var written: [UInt8] = []
    /// Something to hand over at the next flush.
    private var dirty = false
    /// A record created by this open and not written: it is made empty when the file is released (not at every
    /// flush: the shell's redirections flush a file more than once).
    private var createdEmpty: Bool
    private var stdinUsed = false
    private var output: (buffer: ByteStreamBuffer, producer: Task<Void, Never>)?

    init(node: FSNode, fs: CircuitFileSystem, created: Bool) {
        self.node = node
        self.fs = fs
        self.createdEmpty = created
    }

    /// Writes larger than this are refused (a message, a command, a record).
    static let maxWritten = 64 << 20

    // MARK: - Reads

    func read(offset: Int, size: Int) async throws(FSError) -> [UInt8] {
        if case .elementFile(let host, _, let name, let file) = node, file == "stdout" || file == "stderr" {
            return try await readOutput(host: host, path: "/\(host)/\(name)", stream: file, size: size)
        }
        let task: Task<[UInt8], any Error>
        if let content {
            task = content
        } else {
            let node = self.node
            let fs = self.fs
            task = Task { try await OpenFile.content(of: node, fs: fs) }
            content = task
        }
        let bytes: [UInt8]
        do {
            bytes = try await withTaskCancellationHandler { try await task.value } onCancel: { task.cancel() }
        } catch let error as FSError {
            content = nil  // a later read may try again
            throw error
        } catch {
            content = nil
            throw FSError(EINTR, "interrupted")
        }
        guard offset < bytes.count else { return [] }
        return Array(bytes[offset..<min(bytes.count, offset + size)])
    }

    private func readOutput(host: String, path: String, stream: String, size: Int) async throws(FSError) -> [UInt8] {
        if output == nil {
            let buffer = ByteStreamBuffer()
            let fs = self.fs
            let producer = Task {
                do {
                    try await fs.hostClient(host).readOutput(path, stream: stream) { chunk in
                        guard await buffer.put(chunk) else { throw CancellationError() }
                    }
                    await buffer.finish(nil)
                } catch {
                    await buffer.finish(fs.failure(path, any: error))
                }
            }
            output = (buffer, producer)
        }
        return try await output!.buffer.take(max: size)
    }

    /// What a file read whole holds.
    private static func content(of node: FSNode, fs: CircuitFileSystem) async throws(FSError) -> [UInt8] {
        switch node {
        case .rootHelp: return Array(FSHelp.root.utf8)
        case .hostHelp(let h): return Array(FSHelp.host(h).utf8)
        case .dcHelp: return Array(FSHelp.dc.utf8)
        case .sysFile(let host, let file):
            let sys: SysView
            let owner = try await fs.hostClient(host)
            do { sys = try await owner.sys() } catch { throw FSError(error) }
            switch file {
            case "cpus": return Array("\(sys.cpus)\n".utf8)
            case "memory": return Array("\(sys.memoryBytes) \(sys.memoryAvailableBytes)\n".utf8)
            case "load": return Array((sys.load.map { String(format: "%.2f", $0) }.joined(separator: " ") + "\n").utf8)
            case "raft": return Array("\(sys.role) \(sys.term) \(sys.leader ?? "-")\n".utf8)
            default: return try json(sys)
            }
        case .record(let path):
            do {
                return Array(Data(base64Encoded: try await fs.client.get(path).valueBase64) ?? Data())
            } catch {
                throw FSError(error)
            }
        case .elementFile(let host, let kind, let name, let file):
            return try await elementContent("/\(host)/\(name)", kind, file, fs: fs)
        default:
            throw FSError(EISDIR, "a directory")
        }
    }

    private static func elementContent(
        _ path: String, _ kind: ElementKind, _ file: String, fs: CircuitFileSystem
    ) async throws(FSError) -> [UInt8] {
        if file == "help" {
            switch kind {
            case .proc: return Array(FSHelp.proc.utf8)
            case .chan: return Array(FSHelp.chan.utf8)
            case .select: return Array(FSHelp.select.utf8)
            }
        }
        if file == "error" {
            let text = fs.lastError(path)
            return Array((text.isEmpty ? "" : text + "\n").utf8)
        }
        do {
            switch (kind, file) {
            case (.proc, "stat"), (.select, "stat"): return try json(try await fs.client.peek(path))
            case (.proc, "run"):
                guard let command = try await fs.client.peek(path).command else { return [] }
                return try json(command)
            case (.proc, "env"):
                let env = try await fs.client.peek(path).command?.env ?? []
                return Array(env.map { $0 + "\n" }.joined().utf8)
            case (.proc, "waitexit"): return try json(try await fs.waiting.wait(path))
            case (.chan, "cap"):
                guard let capacity = try await fs.client.peek(path).capacity else { return [] }
                return Array("\(capacity)\n".utf8)
            case (.chan, "stat"): return try json(try await (try await fs.chan(path, waiting: false)).stat())
            case (.chan, "recv"): return try await (try await fs.chan(path, waiting: true)).receive()
            case (.chan, "tryrecv"): return try await (try await fs.chan(path, waiting: false)).tryReceive()
            case (.select, "select"): return Array((try await fs.client.peek(path).clauses ?? "").utf8) + [10]
            case (.select, "wait"):
                let outcome = try await fs.waiting.select(path)
                fs.remember(path, outcome)
                return try json(outcome)
            case (.select, "message"):
                var outcome: SelectOutcomeView
                if let seen = fs.lastOutcome(path) {
                    outcome = seen
                } else {
                    outcome = try await fs.waiting.select(path)
                    fs.remember(path, outcome)
                }
                if let base64 = outcome.messageBase64, let data = Data(base64Encoded: base64) { return Array(data) }
                return Array((outcome.message ?? "").utf8)
            default:
                throw FSError(EACCES, "\(file) is not for reading")
            }
        } catch {
            // Only reserved (made by mkdir, not given run, cap or select yet)? Then say so.
            if error is CircuitClientError, !Task.isCancelled, let reservation = await fs.reservation(path) {
                if file == "stat" { return try json(reservation) }
                throw fs.failure(path, any: Self.notMade(path, kind))
            }
            throw fs.failure(path, any: error)
        }
    }

    /// Makes an element that is made once: the name already holding it is EBUSY with `already`.
    private func once(_ already: String, _ make: () async throws(CircuitClientError) -> Void) async throws(FSError) {
        do {
            try await make()
        } catch {
            if case .api(let e) = error, e.code == "exists" { throw FSError(EBUSY, already) }
            throw FSError(error)
        }
    }

    private static func notMade(_ path: String, _ kind: ElementKind) -> FSError {
        FSError(EINVAL, "\(path) is not made yet: write \(kind == .proc ? "run" : kind == .chan ? "cap" : "select") first")
    }

    private static func json<T: Encodable>(_ value: T) throws(FSError) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        do { return Array(try encoder.encode(value)) + [10] } catch { throw FSError(EIO, "\(error)") }
    }

    // MARK: - Writes

    func write(_ bytes: [UInt8]) async throws(FSError) -> Int {
        if case .elementFile(let host, .proc, let name, "stdin") = node {
            let path = "/\(host)/\(name)"
            do {
                _ = try await fs.hostClient(host, waiting: true).writeStdin(path, bytes, keepOpen: true)
            } catch {
                throw fs.failure(path, any: error)
            }
            stdinUsed = true
            return bytes.count
        }
        guard written.count + bytes.count <= Self.maxWritten else {
            throw FSError(EFBIG, "more than \(Self.maxWritten) bytes written to one file")
        }
        written += bytes
        dirty = true
        createdEmpty = false
        if isComplete() { try await flush() }
        return bytes.count
    }

    /// Whether what was written is whole already, so it is handed over now and a failure is write's errno (many
    /// programs, the shell's `echo` among them, ignore close's): a try-send is one message per write; `close` and
    /// `abort` take any write; a capacity or a signal ends with a newline; a command or clauses once they parse as
    /// JSON. The rest waits for close.
    private func isComplete() -> Bool {
        guard case .elementFile(_, let kind, _, let file) = node else { return false }
        switch (kind, file) {
        case (.chan, "trysend"), (.chan, "close"), (.select, "abort"): return true
        case (.chan, "cap"), (.proc, "signal"): return written.last == UInt8(ascii: "\n")
        case (.proc, "run"), (.select, "select"): return (try? JSONSerialization.jsonObject(with: Data(written))) != nil
        default: return false
        }
    }

    /// Hands over what was written since the last flush.
    func flush() async throws(FSError) {
        guard dirty else { return }
        let bytes = written
        written = []
        dirty = false
        switch node {
        case .record(let path):
            do { _ = try await fs.client.put(path, bytes) } catch { throw FSError(error) }
        case .elementFile(let host, let kind, let name, let file):
            try await commit("/\(host)/\(name)", kind, file, bytes)
        default:
            throw FSError(EACCES, "not writable")
        }
    }

    private func commit(_ path: String, _ kind: ElementKind, _ file: String, _ bytes: [UInt8]) async throws(FSError) {
        // Only for the short files (cap, signal): a message may be megabytes.
        var text: String { String(decoding: bytes, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) }
        do {
            switch (kind, file) {
            case (.proc, "run"):
                let command: ProcCommandView
                do {
                    command = try JSONDecoder().decode(ProcCommandView.self, from: Data(bytes))
                } catch {
                    throw FSError(EINVAL, "run: not a command in JSON ({\"path\": ..., \"args\": [...], \"env\": [...]}): \(Self.reason(error))")
                }
                _ = try await fs.client.run(path, command)
                fs.created(path)
            case (.proc, "signal"):
                guard !text.isEmpty else { throw FSError(EINVAL, "signal: write a signal's name or number") }
                _ = try await fs.client.signal(path, text)
            case (.chan, "cap"):
                guard let capacity = UInt32(text) else {
                    throw FSError(EINVAL, "cap: \(text.debugDescription) is not a capacity (0 or more)")
                }
                try await once("cap: the capacity of \(path) is already set") {
                    () async throws(CircuitClientError) in _ = try await fs.client.makeChannel(path, capacity: capacity)
                }
                fs.created(path)
            case (.chan, "send"):
                _ = try await (try await fs.chan(path, waiting: true)).send(bytes)
            case (.chan, "trysend"):
                _ = try await (try await fs.chan(path, waiting: false)).trySend(bytes)
            case (.chan, "close"):
                _ = try await (try await fs.chan(path, waiting: false)).close()
            case (.select, "select"):
                let clauses: [SelectClauseView]
                do {
                    clauses = try JSONDecoder().decode([SelectClauseView].self, from: Data(bytes))
                } catch {
                    throw FSError(EINVAL, "select: not a JSON array of clauses: \(Self.reason(error))")
                }
                try await once("select: the clauses of \(path) are already set") {
                    () async throws(CircuitClientError) in _ = try await fs.client.makeSelect(path, clauses: clauses)
                }
                fs.created(path)
            case (.select, "abort"):
                _ = try await fs.client.remove(element: path)
            default:
                throw FSError(EACCES, "\(file) is not for writing")
            }
        } catch {
            // The cluster refused it because the name is only reserved? Say what to write first.
            if error is CircuitClientError, !Task.isCancelled, file != "abort", await fs.reservation(path) != nil {
                throw fs.failure(path, any: Self.notMade(path, kind))
            }
            throw fs.failure(path, any: error)
        }
    }

    private static func reason(_ error: any Error) -> String {
        switch error as? DecodingError {
        case .dataCorrupted(let c): return c.debugDescription
        case .keyNotFound(let key, _): return "\(key.stringValue) is missing"
        case .typeMismatch(_, let c): return "\(c.codingPath.map(\.stringValue).joined(separator: ".")): \(c.debugDescription)"
        case .valueNotFound(_, let c): return "\(c.codingPath.map(\.stringValue).joined(separator: ".")): \(c.debugDescription)"
        default: return "\(error)"
        }
    }

    // MARK: - Close

    func release() async {
        content?.cancel()
        if createdEmpty, case .record(let path) = node { _ = try? await fs.client.put(path, []) }
        if let output {
            await output.buffer.cancel()
            output.producer.cancel()
        }
        if stdinUsed, case .elementFile(let host, .proc, let name, "stdin") = node {
            _ = try? await fs.hostClient(host).writeStdin("/\(host)/\(name)", [], keepOpen: false)
        }
    }
}
