import ArgumentParser
import CircuitClient
import CircuitFS
import Foundation
import Logging
import ServiceLifecycle

/// `circuit mount DIR`: the cluster as a file system (the slides' layout; `cat DIR/help`). Serves until SIGTERM or
/// SIGINT, then unmounts.
struct Mount: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Mount the cluster as a file system at DIR (default /circuit) until SIGTERM or SIGINT.")
    @OptionGroup var options: ClientOptions
    @OptionGroup var global: GlobalOptions
    @Argument(help: "Where to mount.") var directory: String = "/circuit"
    @Flag(help: "Let other users use the mount too (FUSE's allow_other; for a user other than root, /etc/fuse.conf needs user_allow_other). Off: the mount is yours alone.")
    var allowOther = false

    func run() async throws {
        let logger = global.makeLogger("circuit.mount")
        guard let node = options.client.endpoints.first else { throw ValidationError("no node to speak to") }
        let service = MountService(
            mountpoint: directory, node: node, tls: ClientTLS.default, allowOther: allowOther, logger: logger)
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: service)], gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }
}
