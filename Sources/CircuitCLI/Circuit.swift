import ArgumentParser
import CircuitNode
import Foundation
import Logging

@main
struct Circuit: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "circuit",
        abstract: "Distributed control of a cluster of hosts.",
        subcommands: [
            Start.self, Join.self, Mount.self, Dev.self, Status.self, Members.self, Ls.self, Get.self, Put.self, Cas.self, Del.self,
            Mkseq.self, Peek.self, Watch.self, Run.self, Wait.self, Signal.self, Mkchan.self, MkJoin.self, MkLeave.self, Mksel.self, SelectWait.self, Send.self, Recv.self, Close.self, Stat.self, Mkproc.self, Runall.self, Stdin.self, Stdout.self, Stderr.self, Scrub.self, Waitall.self, Promote.self, Leave.self, TransferLeader.self, ID.self, CA.self, TokenCommand.self, Demo.self, Bench.self, Debug.self,
        ]
    )

    /// Exit status: 0 on success, 1 on an error, 2 on wrong usage; an error is one line, never a stack trace.
    static func main() async {
        Allocator.tuneForLargeMessages()
        do {
            var command = try parseAsRoot()
            if var command = command as? any AsyncParsableCommand {
                try await command.run()
            } else {
                try command.run()
            }
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                exit(withError: error)
            }
            let message = fullMessage(for: error)
            FileHandle.standardError.write(Data(("circuit: " + message + "\n").utf8))
            let isUsage = code == .validationFailure || error is ValidationError
            Foundation.exit(isUsage ? 2 : 1)
        }
    }
}

/// Options every verb shares.
struct GlobalOptions: ParsableArguments {
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: Logger.Level = .warning

    func makeLogger(_ label: String) -> Logger {
        let level = logLevel
        LoggingSystem.bootstrap { label in LazyMetadataLogHandler(label: label, level: level) }
        return Logger(label: label)
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}
