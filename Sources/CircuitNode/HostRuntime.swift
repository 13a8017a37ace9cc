import CircuitAPI
import CircuitClient
import Logging
import ServiceLifecycle
import Synchronization

/// What this host runs for the cluster: its processes (`ProcRunner`), its channels' buffers (`Channels`), and the
/// feeds of its membership subscriptions (`@join`, `@leave`), which are read as channels.
///
/// One scan and watch of the host's subtree drives both. It reads the cluster through this host's own API (a
/// member's, or a worker's that relays), so members and workers run it alike: it takes the revision, lists the
/// subtree linearizably, then watches it from after that revision; again after any error.
final class HostRuntime: Sendable {
    let hostID: String
    let api: String
    let procs: ProcRunner
    let channels: Channels
    let selects: Selects
    let logger: Logger
    /// The feed of each subscription element on this host, by path.
    private let feeds = Mutex<[String: (createRevision: UInt64, task: Task<Void, Never>)]>([:])

    init(
        config: NodeConfig, hostID: String, logger: Logger, ownerAddress: @escaping @Sendable (String) async throws -> String?
    ) {
        let api = config.advertisedClient
        self.hostID = hostID
        self.api = api
        self.logger = logger
        procs = ProcRunner(hostID: hostID, api: api, scrubGrace: .milliseconds(config.scrubGraceMillis), logger: logger)
        selects = Selects(hostID: hostID, api: api, ownerAddress: ownerAddress)
        channels = Channels(
            maxMessageBytes: config.maxMessageBytes, maxBufferedBytes: config.maxBufferedBytes,
            lookup: { path in try await HostRuntime.peekIfPresent(path, at: api) }, ownerAddress: ownerAddress)
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
        let running = feeds.withLock { f -> [Task<Void, Never>] in
            defer { f = [:] }
            return f.values.map(\.task)
        }
        for task in running { task.cancel() }
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
        var subscriptions: [String: UInt64] = [:]
        for path in listing.names {
            let full = path.hasPrefix("/") ? path : root + "/" + path
            guard let view = try await Self.peekIfPresent(full, at: api), let created = view.createRevision else { continue }
            if view.kind == "proc" {
                procs[full] = created
                self.procs.consider(full, view)
            } else if view.kind == "chan" {
                chans[full] = created
            } else if view.kind == "subscription" {
                subscriptions[full] = created
                chans[full] = created
                subscribe(full, view)
            }
        }
        self.procs.keep(only: procs)
        // Feeds first, as for a removal below: an ended feed puts no channel back.
        for path in feeds.withLock({ f in f.filter { subscriptions[$0.key] != $0.value.createRevision }.map(\.key) }) {
            unsubscribe(path)
        }
        channels.keep(only: chans, listedAt: from - 1)
        for try await event in client.watch(root, from: from) {
            if event.kind == "delete" {
                // Each leaves alone a newer element at the path, started from a peek that was ahead of this event.
                self.procs.scrubbed(event.path, deletedAt: event.revision)
                // The feed first: once it is gone it delivers nothing, so the channel removed stays removed.
                unsubscribe(event.path, deletedAt: event.revision)
                channels.removed(event.path, at: event.revision)
            } else if event.kind == "put", let view = try await Self.peekIfPresent(event.path, at: api) {
                if view.kind == "proc" { self.procs.consider(event.path, view) }
                if view.kind == "subscription" { subscribe(event.path, view) }
            }
        }
    }

    // MARK: - Subscriptions

    private func subscribe(_ path: String, _ view: ElementView) {
        guard let created = view.createRevision else { return }
        let join = view.events == "join"
        feeds.withLock { f in
            if f[path]?.createRevision == created { return }
            f[path]?.task.cancel()
            f[path] = (created, Task { await feed(path, createRevision: created, join: join) })
        }
    }

    /// Ends the feed at `path`; with `deletedAt`, only the feed of an element created before that revision.
    private func unsubscribe(_ path: String, deletedAt revision: UInt64? = nil) {
        feeds.withLock { f -> Task<Void, Never>? in
            guard let feed = f[path], revision.map({ feed.createRevision < $0 }) ?? true else { return nil }
            return f.removeValue(forKey: path)?.task
        }?.cancel()
    }

    /// Sends a subscription its events, each a host's path (`/X...`): a join subscription first gets every live host,
    /// then each host that joins after the element was created (a host listed first and then seen joining is sent
    /// once); a leave subscription gets each host that leaves or expires after it was created.
    private func feed(_ path: String, createRevision: UInt64, join: Bool) async {
        logger.debug("subscription feed starts", metadata: ["path": "\(path)", "join": "\(join)"])
        let client = CircuitClient(endpoints: [api])
        var sent = Set<String>()
        func send(_ host: String) {
            logger.debug("subscription event", metadata: ["path": "\(path)", "event": "\(host)"])
            // Delivered only while this is the path's feed, checked under the same lock `unsubscribe` takes: a feed
            // ended (its element removed) must not put its channel back.
            let taken = feeds.withLock { f -> Bool? in
                guard f[path]?.createRevision == createRevision else { return nil }
                return channels.deliver(path, createRevision: createRevision, Array(host.utf8))
            }
            if taken == false {
                logger.warning("a subscription holds all it can: an event was dropped", metadata: ["path": "\(path)", "event": "\(host)"])
            }
        }
        var from = createRevision + 1
        if join {
            while !Task.isCancelled {
                do {
                    for host in try await client.members().filter({ $0.state == "alive" }).map({ "/" + $0.id }).sorted() {
                        if sent.insert(host).inserted { send(host) }
                    }
                    break
                } catch {
                    try? await Task.sleep(for: .milliseconds(300))
                }
            }
        }
        while !Task.isCancelled {
            do {
                for try await event in client.watch("/", from: from, hostsOnly: true) {
                    from = event.revision + 1
                    switch (join, event.kind) {
                    case (true, "host_joined"): if sent.insert(event.path).inserted { send(event.path) }
                    case (true, "host_left"): sent.remove(event.path)
                    case (false, "host_left"): send(event.path)
                    default: break
                    }
                }
            } catch {
                if case .api(let e)? = error as? CircuitClientError, e.code == "compacted",
                    let now = try? await client.status().revision
                {
                    logger.warning("a subscription's feed fell behind the history: events were missed", metadata: ["path": "\(path)"])
                    from = now + 1
                }
            }
            try? await Task.sleep(for: .milliseconds(300))
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
