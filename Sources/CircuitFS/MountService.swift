import CircuitClient
import CircuitSecurity
import Foundation
import Logging
import ServiceLifecycle

/// The mount as a service: mounts at `run()` on a thread of its own (libfuse's loop blocks), unmounts on graceful
/// shutdown (SIGTERM, SIGINT) and returns once the mount is gone. A mount that fails ends the service with the error.
public struct MountService: Service {
    public let mount: FuseMount

    /// A mount at `mountpoint` answering through the API of `node` (`host:port`), acting with the client identity
    /// `tls` (nil: plaintext); `allowOther`: see `FuseMount.allowOther`.
    public init(mountpoint: String, node: String, tls: TLSFiles?, allowOther: Bool = false, logger: Logger) {
        let fs = CircuitFileSystem(client: CircuitClient(endpoints: [node], tls: tls), logger: logger)
        self.mount = FuseMount(mountpoint: mountpoint, fs: fs, allowOther: allowOther, logger: logger)
    }

    public func run() async throws {
        let mount = self.mount
        let ended: Result<Void, FuseMountError> = await withTaskCancellationOrGracefulShutdownHandler {
            await withCheckedContinuation { (done: CheckedContinuation<Result<Void, FuseMountError>, Never>) in
                let thread = Thread {
                    do throws(FuseMountError) {
                        try mount.run()
                        done.resume(returning: .success(()))
                    } catch {
                        done.resume(returning: .failure(error))
                    }
                }
                thread.name = "fuse"
                thread.start()
            }
        } onCancelOrGracefulShutdown: {
            mount.shutdown()
        }
        if case .failure(let error) = ended {
            mount.logger.error("the mount at \(mount.mountpoint) failed: \(error)")
            throw error
        }
    }
}
