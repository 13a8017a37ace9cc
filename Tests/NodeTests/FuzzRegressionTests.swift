import CircuitFuzzing
import Foundation
import Testing

/// The inputs the fuzzers start from (Fuzz/seeds) and those of every crash they found (Fuzz/regressions), replayed
/// through their targets on every test run: a fixed crash stays fixed.
@Suite("Fuzz inputs replayed")
struct FuzzRegressionTests {
    private static var root: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fuzz")
    }

    @Test("the committed seeds are the ones circuit-fuzz writes, and every committed input passes through its target")
    func replay() throws {
        var replayed = 0
        for (target, run) in FuzzTargets.all {
            let seeds = FuzzTargets.seeds()[target] ?? []
            #expect(!seeds.isEmpty, "\(target) has seeds")
            for (i, seed) in seeds.enumerated() {
                let file = Self.root.appendingPathComponent("seeds/\(target)/seed-\(i)")
                #expect((try? Data(contentsOf: file)).map(Array.init) == seed, "\(file.path) is stale: run circuit-fuzz seeds Fuzz/seeds")
            }
            for folder in ["seeds", "regressions"] {
                let dir = Self.root.appendingPathComponent("\(folder)/\(target)")
                for name in (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? [] where !name.hasPrefix(".") {
                    run(Array(try Data(contentsOf: dir.appendingPathComponent(name))))
                    replayed += 1
                }
            }
        }
        #expect(replayed >= 10)
    }
}
