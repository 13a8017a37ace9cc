import Foundation

/// Why a wait gave up.
public struct WaitTimedOut: Error, CustomStringConvertible {
    public var what: String
    public var description: String { "timed out waiting for \(what)" }
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

/// A new, empty temporary folder.
public func temporaryFolder(_ prefix: String) throws -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("\(prefix)-\(UUID().uuidString.prefix(8))")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    return dir.path
}
