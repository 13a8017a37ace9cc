import CircuitSecurity
import Logging
import ServiceLifecycle
import UnixSignals

/// Reads the TLS files again on SIGHUP (they are also looked at on each new connection, at most once a second):
/// rotated certificates are taken up without a restart; a set that does not load keeps the previous one, and says why.
/// Without TLS a SIGHUP is only logged (its default would end the daemon).
struct TLSReloader: Service {
    let tls: TLSFiles?
    let logger: Logger

    func run() async throws {
        for await _ in await UnixSignalsSequence(trapping: .sighup).cancelOnGracefulShutdown() {
            guard let tls else {
                logger.notice("SIGHUP: no TLS files to reload")
                continue
            }
            do {
                let grant = try tls.reload()
                logger.info("reloaded the TLS certificate (SIGHUP)", metadata: ["certificate": "\(grant)"])
            } catch {
                logger.error("could not reload the TLS files; the previous certificate stays in use", metadata: ["error": "\(error)"])
            }
        }
    }
}
