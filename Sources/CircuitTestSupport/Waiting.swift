import Foundation

/// Why a wait gave up.
public struct WaitTimedOut: Error, CustomStringConvertible {
    public var what: String
    public var description: String { "timed out waiting for \(what)" }
    public init(what: String) { self.what = what }
}

/// Polls `condition` every few milliseconds until it holds, or throws after `timeout`: a wait on a condition with a
/// deadline, never a sleep standing in for synchronisation.
public func waitFor(_ what: String, timeout: Duration = .seconds(10), _ condition: () -> Bool) async throws {
    let deadline = ContinuousClock.now + timeout
    while !condition() {
        guard ContinuousClock.now < deadline else { throw WaitTimedOut(what: what) }
        try await Task.sleep(for: .milliseconds(2))
    }
}

/// Polls `find` until it answers something, and answers that (one look per poll: what it finds cannot change
/// between the check and the use, as a leader between holders can); throws after `timeout`.
public func waitForSome<T>(_ what: String, timeout: Duration = .seconds(10), _ find: () -> T?) async throws -> T {
    var found: T?
    try await waitFor(what, timeout: timeout) {
        found = find()
        return found != nil
    }
    return found!
}

/// A new, empty temporary folder.
public func temporaryFolder(_ prefix: String) throws -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("\(prefix)-\(UUID().uuidString.prefix(8))")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    return dir.path
}

/// The `circuit` executable built beside the test bundle.
public func circuitBinary() -> String? {
    var candidates: [URL] = []
    let argv0 = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
    candidates.append(argv0.deletingLastPathComponent().appendingPathComponent("circuit"))
    candidates.append(Bundle.main.bundleURL.deletingLastPathComponent().appendingPathComponent("circuit"))
    candidates.append(URL(fileURLWithPath: FileManager.default.currentDirectoryPath).appendingPathComponent(".build/debug/circuit"))
    return candidates.map(\.path).first { FileManager.default.isExecutableFile(atPath: $0) }
}

/// `waitFor` for a condition that must itself wait (a call to a server).
public func eventually(_ what: String, timeout: Duration = .seconds(10), _ condition: () async -> Bool) async throws {
    let deadline = ContinuousClock.now + timeout
    while await !condition() {
        guard ContinuousClock.now < deadline else { throw WaitTimedOut(what: what) }
        try await Task.sleep(for: .milliseconds(10))
    }
}

/// Thrown by an `eventuallySucceeds` body whose answer is not the one awaited yet: `why` is what it was.
public struct NotYet: Error, CustomStringConvertible {
    public var description: String
    public init(_ why: String) { description = why }
}

/// Calls `body` until it returns instead of throwing, and answers what it returned; after `timeout`, throws
/// `WaitTimedOut` naming the last error, so that a wait that fails says why.
public func eventuallySucceeds<T>(_ what: String, timeout: Duration = .seconds(10), _ body: () async throws -> T) async throws -> T {
    let deadline = ContinuousClock.now + timeout
    while true {
        do {
            return try await body()
        } catch {
            guard ContinuousClock.now < deadline else { throw WaitTimedOut(what: "\(what) (the last attempt failed: \(error))") }
        }
        try await Task.sleep(for: .milliseconds(10))
    }
}

/// Runs `body`, or throws `WaitTimedOut` if it has not finished within `timeout` (the body is cancelled): for
/// waits on a stream, which cannot be polled.
public func withDeadline<T: Sendable>(
    _ what: String, timeout: Duration = .seconds(10), _ body: @escaping @Sendable () async throws -> T
) async throws -> T {
    try await withThrowingTaskGroup(of: T.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await Task.sleep(for: timeout)
            throw WaitTimedOut(what: what)
        }
        defer { group.cancelAll() }
        return try await group.next()!
    }
}

/// Runs `body` on a thread of its own, off Swift's cooperative pool (one thread per core): for CPU-heavy or blocking
/// test work, so that the tests awaiting answers from real daemons meanwhile are not starved of threads.
public func onOwnThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        let thread = Thread { continuation.resume(with: Result { try body() }) }
        thread.stackSize = 8 << 20
        thread.start()
    }
}
