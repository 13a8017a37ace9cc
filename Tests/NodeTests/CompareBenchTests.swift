import CircuitTestSupport
import Foundation
import Testing

/// `circuit bench compare` runs end to end: Circuit, and etcd and ZooKeeper when `scripts/setup` installed them, each
/// three real members on loopback driven by the one load generator, with a leader killed and restarted. A short run:
/// what it checks is that every driver speaks its system's protocol and every figure is measured, not the figures.
/// Each window is a second: with 0.3 s, one operation slowed by the suites running beside it (a debug build, the
/// chaos suite's five daemons) could span the whole window and leave a figure with no sample.
@Suite("The side-by-side benchmark", .serialized)
struct CompareBenchTests {
    @Test("bench compare measures every figure of every installed system and writes the table as Markdown and JSON")
    func shortRun() async throws {
        var systems = ["circuit"]
        if FileManager.default.isExecutableFile(atPath: "/usr/bin/etcd") { systems.append("etcd") }
        if FileManager.default.fileExists(atPath: "/usr/share/java/zookeeper.jar") { systems.append("zookeeper") }
        let results = try temporaryFolder("compare-results")
        defer { try? FileManager.default.removeItem(atPath: results) }
        let (status, out, err) = try await runCircuit([
            "bench", "compare", "--no-install", "--systems", systems.joined(separator: ","), "--clients", "2", "--seconds", "1",
            "--rounds", "1", "--failovers", "1", "--keys", "50", "--inserts", "200", "--watch-samples", "3", "--results", results,
        ])
        #expect(status == 0, "\(err.suffix(3000))")
        let names = try FileManager.default.contentsOfDirectory(atPath: results)
        let json = try #require(names.first { $0.hasSuffix(".json") }, "no JSON in \(names)")
        #expect(names.contains { $0.hasSuffix(".md") })
        struct Document: Decodable {
            struct Row: Decodable {
                let figure: String
                let summary: [String: Double]
                let ratio: Double?
            }
            let systems: [String]
            let rows: [Row]
        }
        let document = try JSONDecoder().decode(Document.self, from: Data(contentsOf: URL(fileURLWithPath: "\(results)/\(json)")))
        let expected = systems.map { ["circuit": "Circuit", "etcd": "etcd", "zookeeper": "ZooKeeper"][$0]! }
        #expect(document.systems == expected)
        // writes, p50, p99, reads, compare-and-sets; watch p50, p99; RSS; creates, disk; failover.
        #expect(document.rows.count == 11, "\(document.rows.map(\.figure))")
        for row in document.rows {
            for system in expected {
                #expect((row.summary[system] ?? 0) > 0, "\(row.figure): \(system) has no figure")
            }
            if expected.count > 1 { #expect(row.ratio != nil, "\(row.figure): no ratio") }
        }
        #expect(out.contains("| figure | unit | " + expected.joined(separator: " | ") + " | ratio |"), "\(out)")
    }
}
