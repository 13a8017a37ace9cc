import CircuitFuzzing
import Foundation

// Built by `scripts/fuzz` with `-sanitize=fuzzer -D CIRCUIT_FUZZ`: libFuzzer's entry point, the target chosen by
// $CIRCUIT_FUZZ_TARGET. Built without them (every `swift build`): a replay of files through a target,
// `circuit-fuzz TARGET FILE...`, which is how a crash the fuzzer found is looked at.

#if CIRCUIT_FUZZ
nonisolated(unsafe) private var chosen: (@Sendable ([UInt8]) -> Void)?

@_silgen_name("LLVMFuzzerRunDriver")
private func runDriver(
    _ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
) -> CInt

// SwiftPM links an executable's entry point under this name (`--defsym main=circuit_fuzz_main`): hand over to libFuzzer.
@_cdecl("circuit_fuzz_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var argc = argc
    var argv = argv
    return runDriver(&argc, &argv) { data, size in fuzzOneInput(data, size) }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    if chosen == nil {
        let name = ProcessInfo.processInfo.environment["CIRCUIT_FUZZ_TARGET"] ?? ""
        guard let target = FuzzTargets.all[name] else {
            fatalError("set CIRCUIT_FUZZ_TARGET to one of \(FuzzTargets.all.keys.sorted())")
        }
        chosen = target
    }
    chosen!(data.map { Array(UnsafeBufferPointer(start: $0, count: size)) } ?? [])
    return 0
}
#else
@main
struct Replay {
    static func main() throws {
        let arguments = CommandLine.arguments.dropFirst()
        if arguments.first == "seeds", let folder = arguments.dropFirst().first {
            for (target, inputs) in FuzzTargets.seeds() {
                try FileManager.default.createDirectory(atPath: "\(folder)/\(target)", withIntermediateDirectories: true)
                for (i, input) in inputs.enumerated() {
                    try Data(input).write(to: URL(fileURLWithPath: "\(folder)/\(target)/seed-\(i)"))
                }
            }
            return
        }
        guard let name = arguments.first, let target = FuzzTargets.all[name] else {
            FileHandle.standardError.write(Data("usage: circuit-fuzz \(FuzzTargets.all.keys.sorted().joined(separator: "|")) FILE...\n".utf8))
            exit(2)
        }
        for path in arguments.dropFirst() {
            target(Array(try Data(contentsOf: URL(fileURLWithPath: path))))
            print("\(path): ok")
        }
    }
}
#endif
