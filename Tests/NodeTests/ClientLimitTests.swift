import CircuitAPI
import CircuitClient
import CircuitSecurity
import CircuitTestSupport
import Foundation
import Testing
@testable import CircuitNode

@Suite("per-client limits and the shape of JSON bodies")
struct ClientLimitUnitTests {
    @Test("a client is refused past its streams, and past its watches; closing one makes room; clients are counted apart")
    func counts() {
        var counts = ClientLimitCounts(limits: .init(streams: 3, watches: 2))
        #expect(counts.admit("alice", watch: true) == nil)
        #expect(counts.admit("alice", watch: true) == nil)
        #expect(counts.admit("alice", watch: true) == .watches(limit: 2))
        #expect(counts.admit("alice", watch: false) == nil)
        #expect(counts.admit("alice", watch: false) == .streams(limit: 3))
        #expect(counts.admit("alice", watch: true) == .streams(limit: 3), "a watch is a stream too")
        #expect(counts.admit("bob", watch: true) == nil, "bob has his own count")
        counts.release("alice", watch: true)
        #expect(counts.open["alice"] == .init(streams: 2, watches: 1))
        #expect(counts.admit("alice", watch: true) == nil)
        for watch in [true, true, false] { counts.release("alice", watch: watch) }
        counts.release("bob", watch: true)
        #expect(counts.open.isEmpty, "a client with nothing open is forgotten")
    }

    @Test("watches and waits are what the watch limit counts")
    func whatIsAWatch() {
        #expect(ClientLimits.isWatchPath("GET", "/v1/watch"))
        #expect(ClientLimits.isWatchPath("GET", "/v1/watch/records/a"))
        #expect(ClientLimits.isWatchPath("GET", "/v1/wait/X0000000000000001/p"))
        #expect(!ClientLimits.isWatchPath("GET", "/v1/watchers"))
        #expect(!ClientLimits.isWatchPath("GET", "/v1/records/watch"))
        #expect(!ClientLimits.isWatchPath("POST", "/v1/watch"))
    }

    @Test(
        "JSON nesting past the limit is refused naming the depth; brackets inside strings do not count",
        arguments: [
            (String(repeating: "[", count: 32) + String(repeating: "]", count: 32), true),
            (String(repeating: "[", count: 33) + String(repeating: "]", count: 33), false),
            (String(repeating: "{\"a\":", count: 33) + "1" + String(repeating: "}", count: 33), false),
            ("{\"path\": \"" + String(repeating: "[", count: 100) + "\"}", true),
            ("{\"path\": \"\\\"" + String(repeating: "{", count: 100) + "\"}", true),
            (String(repeating: "[", count: 100_000), false),
        ])
    func depth(json: String, fine: Bool) {
        let problem = JSONLimits.depthProblem(json.utf8)
        #expect((problem == nil) == fine, "\(problem ?? "accepted")")
        if let problem { #expect(problem.contains("deeper than 32")) }
    }
}
