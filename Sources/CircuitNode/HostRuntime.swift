import CircuitAPI
import CircuitClient
import Logging
import ServiceLifecycle

/// What this host runs for the cluster: its processes (`ProcRunner`) and its channels' buffers (`Channels`).
///
/// One scan and watch of the host's subtree drives both. It reads the cluster through this host's own API (a
/// member's, or a worker's that relays), so members and workers run it alike: it takes the revision, lists the
/// subtree linearizably, then watches it from after that revision; again after any error.
final class HostRuntime: Sendable {
    let hostID: String
    let api: String
    let procs: ProcRunner
    let channels: Channels
    let logger: Logger

    init(config: NodeConfig, hostID: String, logger: Logger) {
        let api = config.advertisedClient
        self.hostID = hostID
        self.api = api
        self.logger = logger
        procs = ProcRunner(hostID: hostID, api: api, scrubGrace: .milliseconds(config.scrubGraceMillis), logger: logger)
        channels = Channels(maxMessageBytes: config.maxMessageBytes, maxBufferedBytes: config.maxBufferedBytes) { path in
            try await HostRuntime.peekIfPresent(path, at: api)
        }
    }

    /// Until cancelled: scan, then watch. On the way out the channels' waiters fail and the processes are stopped.
    func run() async {
        let reporter = procs.startReporting()
        while !Task.isCancelled {
            do {
                try await scanAndWatch()
            } catch {
                logger.debug("host runtime: starting over", metadata: ["error": "\(error)"])
            }
            try? await Task.sleep(for: .milliseconds(300))
        }
        channels.removeAll()
        await procs.stop(reporter: reporter)
    }

    private func scanAndWatch() async throws {
        let client = CircuitClient(endpoints: [api])
        let root = "/" + hostID
        let from = try await client.status().revision + 1
        let listing = try await client.list(root, recursive: true)
        var procs: [String: UInt64] = [:]
        var chans: [String: UInt64] = [:]
        for path in listing.names {
            let full = path.hasPrefix("/") ? path : root + "/" + path
            guard let view = try await Self.peekIfPresent(full, at: api), let created = view.createRevision else { continue }
            if view.kind == "proc" {
                procs[full] = created
                self.procs.consider(full, view)
            } else if view.kind == "chan" {
                chans[full] = created
            }
        }
        self.procs.keep(only: procs)
        channels.keep(only: chans)
        for try await event in client.watch(root, from: from) {
            if event.kind == "delete" {
                self.procs.scrubbed(event.path)
                channels.removed(event.path)
            } else if event.kind == "put", let view = try await Self.peekIfPresent(event.path, at: api), view.kind == "proc" {
                self.procs.consider(event.path, view)
            }
        }
    }

    /// The element at `path`, or nil if there is none; any other error is thrown.
    static func peekIfPresent(_ path: String, at api: String) async throws -> ElementView? {
        do {
            return try await CircuitClient(endpoints: [api]).peek(path)
        } catch {
            if case .api(let e) = error, e.code == "not_found" { return nil }
            throw error
        }
    }
}

/// The runtime as a service beside the API.
struct HostRuntimeService: Service {
    let runtime: HostRuntime
    func run() async throws {
        await cancelWhenGracefulShutdown { await runtime.run() }
    }
}
