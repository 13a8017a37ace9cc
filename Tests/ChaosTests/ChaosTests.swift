import CircuitAPI
import CircuitClient
import CircuitNode
import CircuitStateMachine
import CircuitTestSupport
import Foundation
import Synchronization
import Testing

/// How long the nemesis runs (`CHAOS_SECONDS`; 45 in CI) and its seed (`CHAOS_SEED`; random, printed).
enum ChaosSettings {
    static let environment = ProcessInfo.processInfo.environment
    static let seconds = Double(environment["CHAOS_SECONDS"] ?? "") ?? 45
    static let seed = UInt64(environment["CHAOS_SEED"] ?? "") ?? UInt64.random(in: 1...1_000_000)
    /// The run, then up to a few minutes of recovery and checking.
    static let timeLimit = Int(seconds / 60) + 6
    /// A session's time to live, and what an ephemeral record may outlive it by (see `ephemeralsExpire`).
    static let sessionTTL: UInt64 = 2000
    static let expiryBound: UInt64 = 3000
    /// After the nemesis stops and every fault is healed, a write must succeed within this.
    static let recoveryBound: Duration = .seconds(20)
}

/// Five real daemons, each its own process with its own SQLite files and, where the machine allows (root, iproute2,
/// nftables), its own network namespace and address, so partitions drop real packets. Ten clients go through the
/// HTTP API; two keep sessions with ephemeral records; three watch membership. The nemesis runs two loops at once, so
/// faults overlap: processes (kill -9 of the leader or of any node, then restart; SIGSTOP pauses longer than an
/// election; graceful restarts; rolling restarts; a full-cluster kill -9 and restart) and the network
/// (majority/minority partitions with the leader on either side, a bridge, a leader that cannot send). Then every
/// check must hold; see `ChaosRun.check`.
@Suite("Chaos on real daemons", .serialized, .timeLimit(.minutes(ChaosSettings.timeLimit)))
struct ChaosTests {
    @Test("10 clients, sessions and membership watchers on 5 daemons through kills, pauses, restarts and partitions: histories linearizable, no acknowledged write lost, no sequential name twice, ephemerals expire in bound, one membership order, replicas byte-identical")
    func chaos() async throws {
        let binary = try #require(circuitBinary(), "the circuit executable was not built next to the tests")
        // CHAOS_MODE=loopback runs the fallback even where namespaces can be made.
        // Building the network runs `ip` and `nft` a few dozen times and waits for each: off the cooperative pool.
        let (network, why) =
            ChaosSettings.environment["CHAOS_MODE"] == "loopback" ? (nil, "asked for") : try await onOwnThread { ChaosNetwork.make(count: 5) }
        defer { network?.remove() }
        let cluster = try DaemonProcesses(
            binary: binary, base: try temporaryFolder("chaos"), count: 5, sessionTTLMillis: 3000,
            addresses: network?.addresses ?? [])
        if let network { for i in 0..<5 { cluster.namespaces[i] = network.namespaces[i] } }
        // Addresses beyond loopback, as in a deployment: the daemons and every client speak mutual TLS.
        if network != nil { try cluster.enableTLS() }
        cluster.testFaults = network == nil
        let partitions: any Partitioner = network ?? TransportCuts(cluster: cluster)
        let mode =
            network == nil
            ? "loopback (\(why)): partitions drop Raft frames in the peer transport (--test-faults); HTTP between nodes is not cut"
            : why + "; mutual TLS on every connection"
        try cluster.startAll()
        defer { cluster.stopAll(signal: SIGKILL) }
        _ = try await cluster.leader()
        _ = try await cluster.allAlive()
        let run = ChaosRun(cluster: cluster, partitions: partitions, mode: mode, seed: ChaosSettings.seed)
        try await run.go(seconds: ChaosSettings.seconds)
        run.report()
    }
}

/// One run: its clients, its nemesis, what they saw, and the checks.
final class ChaosRun: @unchecked Sendable {
    let cluster: DaemonProcesses
    let partitions: any Partitioner
    let mode: String
    let seed: UInt64
    let log = ChaosLog()
    let registers = Histories()
    /// Clients use three records at a time, new ones every `generation` (as Jepsen's independent keys do): each
    /// history stays short, and so does the checker's search, which grows with the operations of unknown outcome
    /// that overlap.
    let generation: UInt64 = 3_000_000_000
    /// Each name's history of creates and removes.
    let names = Mutex<[String: [Operation<NameModel.Input, NameModel.Output>]]>([:])
    /// Every host id any member ever had (a member removed and added again comes back as a new host).
    let everStarted: Mutex<Set<String>>
    /// Sequential names acknowledged: name → value.
    let sequential = Mutex<[String: String]>([:])
    /// Per ephemeral record: the return time of its session's last acknowledged keep-alive, and the reads after it
    /// (call time, present).
    let ephemerals = Mutex<[String: (lastKeepAlive: UInt64, reads: [(call: UInt64, present: Bool)])]>([:])
    /// What each membership watcher saw, in order.
    let membership = Mutex<[[EventView]]>([[], [], []])
    /// The clients' linearizable membership queries: when each was called and returned, and the session of every
    /// host alive in its answer.
    let sessionsSeen = Mutex<[(call: UInt64, returned: UInt64, alive: [String: UInt64])]>([])
    var recovery: Duration = .zero
    var checkTime: Duration = .zero
    var slowestCheck = ""

    init(cluster: DaemonProcesses, partitions: any Partitioner, mode: String, seed: UInt64) {
        self.cluster = cluster
        self.partitions = partitions
        self.mode = mode
        self.seed = seed
        self.everStarted = Mutex(Set(cluster.members.map(\.folder.hostID)))
    }

    func go(seconds: Double) async throws {
        FileHandle.standardError.write(Data("chaos: seed \(seed), \(seconds) s of nemesis, mode: \(mode)\n".utf8))
        let deadline = ContinuousClock.now + .milliseconds(Int64(seconds * 1000))
        let apis = cluster.apis
        let watchFrom = (try await cluster.live.status().revision) + 1
        let watchers = (0..<3).map { w in Task { await self.watchMembership(w, from: watchFrom, apis: apis) } }
        defer { for w in watchers { w.cancel() } }
        await withThrowingTaskGroup(of: Void.self) { group in
            for c in 0..<10 { group.addTask { await self.client(c, apis: apis, until: deadline) } }
            for s in 0..<2 { group.addTask { await self.sessionClient(s, apis: apis, until: deadline) } }
            group.addTask { try await self.processNemesis(until: deadline) }
            group.addTask { try await self.networkNemesis(until: deadline) }
            do {
                try await group.waitForAll()
            } catch {
                log.violation("the nemesis failed: \(error)")
            }
        }
        // Heal everything, then the cluster must serve a write within the bound.
        try await partitions.heal()
        try reviveCrashed()
        for i in cluster.members.indices where cluster.members[i].process == nil { try cluster.start(i) }
        for i in cluster.members.indices { if let p = cluster.members[i].process { kill(p.processIdentifier, SIGCONT) } }
        let healed = ContinuousClock.now
        var writer = cluster.live
        writer.timeout = 2
        let recovered: Void? = try? await eventually("a write after healing", timeout: ChaosSettings.recoveryBound) {
            (try? await writer.put("/records/chaos/recovered", Array("yes".utf8))) != nil
        }
        recovery = ContinuousClock.now - healed
        if recovered == nil { log.violation("no write succeeded within \(ChaosSettings.recoveryBound) of healing") }
        try await check(watchers: watchers)
    }

    // MARK: - Clients

    /// Reads, writes and compare-and-sets of the registers, sequential creates, and membership queries, on any node.
    func client(_ c: Int, apis: [String], until deadline: ContinuousClock.Instant) async {
        var r = SeededRandom(seed: seed &+ UInt64(c) &* 7919)
        var n = 0
        var failedLast = false
        while ContinuousClock.now < deadline {
            n += 1
            var client = CircuitClient(endpoints: [apis[Int(r.next() % UInt64(apis.count))]], tls: cluster.tls)
            client.timeout = 2
            if n > 1, failedLast { try? await Task.sleep(for: .milliseconds(50)) }  // no busy loop while down
            failedLast = false
            switch r.next() % 20 {
            case 0..<14:
                let key = "g\((nowNanos() - log.start) / generation)-k\(r.next() % 3)"
                failedLast = await !register(client, key, kind: Int(r.next() % 3), value: "c\(c)-\(n)", guess: r.next() % 4, by: c)
            case 14..<16:
                failedLast = await !createSequential(client, value: "c\(c)-\(n)")
            case 16..<18:
                failedLast = await !name(client, r.next() % 2 == 0 ? .create : .remove, slot: r.next(), by: c)
            default:
                do {
                    let call = nowNanos()
                    let hosts = try await client.members()
                    let alive = Dictionary(hosts.filter { $0.state == "alive" }.map { ($0.id, $0.session) }) { a, _ in a }
                    sessionsSeen.withLock { $0.append((call, nowNanos(), alive)) }
                    let known = everStarted.withLock { $0 }
                    if let stranger = hosts.first(where: { !known.contains($0.id) }) {
                        log.violation("a membership query named a host never started: \(stranger.id)")
                    }
                    log.op("members ok")
                } catch {
                    log.op(Self.definitelyNot(error) ? "members fail" : "members info")
                    failedLast = true
                }
            }
        }
    }

    /// One register operation, recorded with its outcome. True if it got a definite answer.
    @discardableResult
    func register(
        _ client: CircuitClient, _ key: String, kind: Int, value: String, guess: UInt64, by who: Int, final: Bool = false
    ) async -> Bool {
        let path = "/records/chaos/\(key)"
        let input: RegisterModel.Input
        switch kind {
        case 0: input = .read
        case 1: input = .write(value)
        default:
            // A compare-and-set at a version near the current one (guessed: sometimes right, sometimes not).
            let current = (try? await client.get(path, stale: true))?.version ?? 0
            input = .compareAndSet(version: current > guess ? current - guess : 0, value: value)
        }
        let name = ["read", "write", "cas"][kind]
        let call = nowNanos()
        let output: RegisterModel.Output
        do {
            switch input {
            case .read:
                do {
                    let r = try await client.get(path)
                    output = .value(r.value, version: r.version)
                } catch .api(let e) where e.code == "not_found" {
                    output = .value(nil, version: 0)
                }
            case .write(let v):
                output = .ok(version: try await client.put(path, Array(v.utf8)).version)
            case .compareAndSet(let version, let v):
                do {
                    output = .ok(version: try await client.put(path, Array(v.utf8), version: version).version)
                } catch .api(let e) where e.code == "version_mismatch" || (version == 0 && e.code == "exists") {
                    output = .mismatch  // at version 0 it is a create, refused with `exists`
                }
            }
        } catch {
            if Self.definitelyNot(error) {
                log.op("\(name) fail")
                return false  // definitely not done: not part of the history
            }
            log.op("\(name) info")
            // It may have taken effect at any time from its call on, or never. A read changes nothing: left out.
            if kind != 0 && !final { registers.add(key, Operation(client: who, input: input, output: nil, call: call, returned: nil)) }
            return false
        }
        registers.add(key, Operation(client: who, input: input, output: output, call: call, returned: nowNanos()))
        log.op("\(name) ok")
        return true
    }

    /// Creates or removes a channel's name, one of two per generation under the host of one member. True if it got a
    /// definite answer.
    func name(_ client: CircuitClient, _ input: NameModel.Input, slot: UInt64, by who: Int) async -> Bool {
        let generation = (nowNanos() - log.start) / generation
        let host = cluster.members[Int((generation &+ slot % 2) % UInt64(cluster.members.count))].folder.hostID
        let path = "/\(host)/chaos/g\(generation)-n\(slot % 2)"
        let what = input == .create ? "create name" : "remove name"
        let call = nowNanos()
        let output: NameModel.Output?
        do {
            switch input {
            case .create:
                var view = ElementView(kind: "chan")
                view.capacity = 1
                try await client.create(path, view)
            case .remove:
                try await client.remove(element: path)
            }
            output = .ok
        } catch .api(let e) where (input == .create && e.code == "exists") || (input == .remove && e.code == "not_found") {
            output = .refused
        } catch {
            if Self.definitelyNot(error) {
                log.op("\(what) fail")
                return false
            }
            output = nil
        }
        names.withLock { $0[path, default: []].append(Operation(client: who, input: input, output: output, call: call, returned: output == nil ? nil : nowNanos())) }
        log.op("\(what) \(output == nil ? "info" : "ok")")
        return output != nil
    }

    @discardableResult
    func createSequential(_ client: CircuitClient, value: String) async -> Bool {
        do {
            let answer = try await client.createSequential("/records/chaos/seq/n-", Array(value.utf8))
            guard let name = answer.path else {
                log.violation("a sequential create answered no name")
                return true
            }
            let earlier = sequential.withLock { names in
                defer { names[name] = names[name] ?? value }
                return names[name]
            }
            if let earlier { log.violation("sequential name \(name) issued twice: to \(earlier) and to \(value)") }
            log.op("sequential ok")
            return true
        } catch {
            log.op(Self.definitelyNot(error) ? "sequential fail" : "sequential info")
            return false
        }
    }

    /// Sessions, each with an ephemeral record: granted, kept alive a while, then left to expire while reads watch
    /// the record go.
    func sessionClient(_ s: Int, apis: [String], until deadline: ContinuousClock.Instant) async {
        var r = SeededRandom(seed: seed &+ 1_000_003 &* UInt64(s + 1))
        while ContinuousClock.now < deadline {
            var client = CircuitClient(endpoints: apis.shuffled(using: &r), tls: cluster.tls)
            client.timeout = 2
            guard let session = try? await client.grantSession(ttlMillis: ChaosSettings.sessionTTL, owner: "chaos\(s)") else {
                log.op("session grant failed")
                try? await Task.sleep(for: .milliseconds(200))
                continue
            }
            let path = "/records/chaos/eph/s\(session)"
            do {
                try await client.put(path, Array("alive".utf8), session: session)
            } catch {
                log.op("ephemeral put failed")
                continue  // the session expires on its own
            }
            var last = nowNanos()
            let keepFor = ContinuousClock.now + .milliseconds(Int64(300 + r.next() % 1700))
            while ContinuousClock.now < keepFor {
                try? await Task.sleep(for: .milliseconds(300))
                let call = nowNanos()
                if (try? await client.keepAlive(session)) != nil {
                    last = nowNanos()
                } else {
                    // Unanswered, it may still reach the leader: a follower forwards it with a 10 s timeout.
                    last = max(last, call + 10_000_000_000)
                }
            }
            ephemerals.withLock { $0[path] = (last, []) }
            log.op("session kept then left")
            // Read until it is gone (or long past any bound: the check reports it).
            let giveUp = ContinuousClock.now + .seconds(30)
            while ContinuousClock.now < giveUp {
                let call = nowNanos()
                var present: Bool?
                do {
                    _ = try await client.get(path)
                    present = true
                } catch .api(let e) where e.code == "not_found" {
                    present = false
                } catch {}
                if let present { ephemerals.withLock { $0[path]?.reads.append((call, present)) } }
                if present == false { break }
                try? await Task.sleep(for: .milliseconds(100))
            }
        }
    }

    /// Membership events from one node's watch; when that node goes, the next one's, from the last revision seen
    /// (a revision may carry several events, and a watch may have been cut between them: those already seen are
    /// skipped).
    func watchMembership(_ w: Int, from: UInt64, apis: [String]) async {
        var resume = from
        var seenOfResume = 0
        var attempt = w
        while !Task.isCancelled {
            let client = CircuitClient(endpoints: [apis[(attempt * 2) % apis.count]], tls: cluster.tls)
            var skip = seenOfResume
            do {
                for try await event in client.watch("/", from: resume, hostsOnly: true) {
                    if event.revision == resume && skip > 0 {
                        skip -= 1
                        continue
                    }
                    membership.withLock { $0[w].append(event) }
                    if event.revision == resume {
                        seenOfResume += 1
                    } else {
                        resume = event.revision
                        seenOfResume = 1
                    }
                }
            } catch {}
            attempt += 1
            try? await Task.sleep(for: .milliseconds(100))
        }
    }

    /// An error that says the operation was not done (nothing was proposed), as opposed to a timeout or a lost
    /// connection, after which it may have been.
    static func definitelyNot(_ error: CircuitClientError) -> Bool {
        switch error {
        case .api(let e):
            return ["no_leader", "leader_unreachable", "not_found", "no_such_session", "no_such_host", "host_not_alive", "bad_request"]
                .contains(e.code)
        case .unreachable: return true  // sent to no node
        case .noAnswer, .badAnswer: return false
        }
    }

    // MARK: - The nemesis

    /// Kills, pauses and restarts, one at a time in this loop (the network loop overlaps them).
    func processNemesis(until deadline: ContinuousClock.Instant) async throws {
        var r = SeededRandom(seed: seed)
        // Every kind once (the long ones first, while there is time), then at random: a short run covers them all.
        var firsts = [0, 7, 13].shuffled(using: &r) + [17, 19, 20].shuffled(using: &r)
        while ContinuousClock.now < deadline - .seconds(2) {
            try await Task.sleep(for: .milliseconds(Int64(300 + r.next() % 700)))
            try await quiet()
            try reviveCrashed()
            let leader = await currentLeader()
            let target = r.next() % 2 == 0 ? (leader ?? 0) : Int(r.next() % 5)
            let who = target == leader ? "the leader (\(target))" : "member \(target)"
            var kind = firsts.popLast() ?? Int(r.next() % 22)
            // A long fault starts only while there is time for it.
            if kind >= 17 && ContinuousClock.now > deadline - .seconds(15) { kind = 0 }
            switch kind {
            case 0..<7:
                let f = log.fault(target == leader ? "kill -9 of the leader" : "kill -9", who)
                cluster.kill9(target)
                try await Task.sleep(for: .milliseconds(Int64(500 + r.next() % 1000)))
                try cluster.start(target)
                await waitReady(target)
                log.healed(f)
            case 7..<13:
                guard let pid = cluster.members[target].process?.processIdentifier else { continue }
                let f = log.fault(target == leader ? "pause of the leader" : "pause", "\(who), 1.5 s (an election is 1 s)")
                kill(pid, SIGSTOP)
                try await Task.sleep(for: .milliseconds(1500))
                kill(pid, SIGCONT)
                log.healed(f)
            case 13..<17:
                let f = log.fault("graceful restart", who)
                await restart(target)
                await waitReady(target)
                log.healed(f)
            case 17..<19:
                let f = log.fault("rolling restart", "each member in turn, SIGTERM then start")
                for i in cluster.members.indices {
                    await restart(i)
                    await waitReady(i)
                }
                log.healed(f)
            case 19:
                let f = log.fault("full-cluster restart", "kill -9 of all five, then start")
                for i in cluster.members.indices { cluster.kill9(i) }
                for i in cluster.members.indices { try cluster.start(i) }
                for i in cluster.members.indices { await waitReady(i) }
                log.healed(f)
            default:
                let f = log.fault("voter removed and re-added", "\(who) removed, wiped, joined as a new host, promoted")
                try await removeAndReAdd(target)
                await waitReady(target)
                log.healed(f)
            }
        }
    }

    /// Partitions, each healed after 1 to 3 s.
    func networkNemesis(until deadline: ContinuousClock.Instant) async throws {
        var r = SeededRandom(seed: seed &* 31 &+ 17)
        var firsts = [0, 1, 2, 3].shuffled(using: &r)
        while ContinuousClock.now < deadline - .seconds(2) {
            try await Task.sleep(for: .milliseconds(Int64(500 + r.next() % 1000)))
            try await quiet()
            let leader = await currentLeader()
            var order = Array(0..<5).shuffled(using: &r)
            let cuts: Set<ChaosNetwork.Pair>
            let f: Int
            switch firsts.popLast().map(UInt64.init) ?? r.next() % 4 {
            case 0:
                // The leader (if any) on the minority side.
                if let leader, let at = order.firstIndex(of: leader) { order.swapAt(0, at) }
                let (minority, majority) = (Array(order[..<2]), Array(order[2...]))
                cuts = ChaosNetwork.between(minority, majority)
                f = log.fault("partition, leader in the minority", "\(minority) | \(majority)")
            case 1:
                let (minority, majority) = (Array(order[..<2]), Array(order[2...]))
                cuts = ChaosNetwork.between(minority, majority)
                f = log.fault("partition", "\(minority) | \(majority)")
            case 2:
                // A bridge: order[2] sees both sides, which do not see each other.
                let (left, right) = ([order[0], order[1]], [order[3], order[4]])
                cuts = ChaosNetwork.between(left, right)
                f = log.fault("bridge", "\(left) | \(order[2]) | \(right)")
            default:
                // One way: the leader's packets to every other member are dropped; it still hears them.
                let from = leader ?? order[0]
                cuts = Set(order.filter { $0 != from }.map { ChaosNetwork.Pair(from: from, to: $0) })
                f = log.fault("one-way, the leader cannot send", "\(from) → all dropped")
            }
            try await partitions.set(cuts)
            try await Task.sleep(for: .milliseconds(Int64(1000 + r.next() % 2000)))
            try await partitions.heal()
            log.healed(f)
        }
    }

    /// Removes member `i`'s host from Raft's membership while the clients run, then brings the member back as a new
    /// host (a wiped data folder) that joins as a learner and is promoted to voter.
    func removeAndReAdd(_ i: Int) async throws {
        let old = cluster.members[i].folder.hostID
        var others = CircuitClient(endpoints: cluster.members.indices.filter { $0 != i }.map { cluster.members[$0].api }, tls: cluster.tls)
        others.timeout = 3
        let removed: Void? = try? await eventually("the removal of \(old)", timeout: .seconds(15)) {
            await (try? others.remove(old)) != nil
        }
        // Replaced even if no answer said it was removed (it may have been): a member still in Raft while wiped is
        // a lost voter, which the leader replaces in turn.
        if removed == nil { log.op("voter removal unanswered in 15 s") }
        try cluster.replace(i, join: cluster.members[(i + 1) % cluster.members.count].api)
        let new = cluster.members[i].folder.hostID
        everStarted.withLock { _ = $0.insert(new) }
        try cluster.start(i)
        var refusal = "none"
        let promoted: Void? = try? await eventually("the promotion of \(new)", timeout: .seconds(30)) {
            do {
                _ = try await others.promote(new)
                return true
            } catch {
                if case .api(let e)? = error as? CircuitClientError { refusal = e.code } else { refusal = "no answer" }
            }
            try? await Task.sleep(for: .milliseconds(200))
            return false
        }
        if promoted == nil { log.op("re-added voter not promoted in 30 s (last answer: \(refusal))") }
    }

    /// The last 5 s of every 15 the nemesis starts nothing (what it started before may still run out): quiet
    /// windows, in which the sessions' expiry is held to its bound.
    func quiet() async throws {
        let phase = (nowNanos() - log.start) % 15_000_000_000
        if phase >= 10_000_000_000 { try await Task.sleep(for: .nanoseconds(Int64(15_000_000_000 - phase))) }
    }

    func currentLeader() async -> Int? {
        for i in cluster.members.indices.shuffled() where cluster.members[i].process != nil {
            var c = cluster.client(i)
            c.timeout = 0.5
            if let id = try? await c.status().leader, let at = cluster.members.firstIndex(where: { $0.folder.hostID == id }) {
                return at
            }
        }
        return nil
    }

    /// SIGTERM (the daemon hands leadership over and stops), then start again; kill -9 if it takes over 15 s.
    func restart(_ i: Int) async {
        if let pid = cluster.members[i].process?.processIdentifier {
            kill(pid, SIGCONT)
            kill(pid, SIGTERM)
            let stopped: Void? = try? await eventually("a graceful stop", timeout: .seconds(15)) {
                !(self.cluster.members[i].process?.isRunning ?? false)
            }
            if stopped == nil {
                // A graceful stop cancels what is still in flight after 5 s, leaves behind what ignores that after
                // 2 s more, and hands leadership over within 2 s.
                log.violation("member \(i) took over 15 s to stop after SIGTERM (at \(log.seconds(nowNanos()))); its log ends:\n\(cluster.logTail(i))")
            }
        }
        cluster.kill9(i)  // reaps it (SIGKILL if it still runs)
        try? cluster.start(i)
    }

    /// Member `i` answers and knows a leader (or 10 s passed): only then is a fault on it healed, so that the time
    /// a daemon takes to boot and the cluster to elect counts as part of the fault.
    func waitReady(_ i: Int) async {
        var c = cluster.client(i)
        c.timeout = 1
        _ = try? await eventually("member \(i) to answer and name a leader", timeout: .seconds(10)) {
            (try? await c.status())?.leader != nil
        }
    }

    /// A daemon that exited when no fault stopped it is a violation (with the end of its log); it is started again.
    func reviveCrashed() throws {
        for (i, m) in cluster.members.enumerated() {
            if let p = m.process, !p.isRunning {
                log.violation("member \(i) exited on its own with status \(p.terminationStatus); its log ends:\n\(cluster.logTail(i))")
                cluster.kill9(i)  // reaps it
                try cluster.start(i)
            }
        }
    }

    // MARK: - Checks

    /// Every check; each failure is a violation, and any violation fails the run with the seed and the schedule.
    func check(watchers: [Task<Void, Never>]) async throws {
        let start = ContinuousClock.now
        defer { checkTime = ContinuousClock.now - start }
        var reader = cluster.live
        reader.timeout = 5
        // The membership watchers catch up first: the names' check needs every host departure.
        let finalRevision = (try? await reader.status().revision) ?? 0
        let lastEvent = membership.withLock { $0.flatMap { $0.map(\.revision) }.filter { $0 <= finalRevision }.max() ?? 0 }
        let caughtUp: Void? = try? await eventually("the membership watchers to catch up", timeout: .seconds(20)) {
            self.membership.withLock { $0.allSatisfy { ($0.last?.revision ?? 0) >= lastEvent } }
        }
        for w in watchers { w.cancel() }
        if caughtUp == nil {
            log.violation("a membership watcher did not reach revision \(lastEvent) within 20 s: \(membership.withLock { $0.map { $0.last?.revision ?? 0 } })")
        }
        // 1. Every register's history, with a final read of each, is linearizable.
        for key in registers.all.keys.sorted() {
            let read: Void? = try? await eventually("a final read of \(key)", timeout: .seconds(30)) {
                await self.register(reader, key, kind: 0, value: "", guess: 0, by: -1, final: true)
            }
            if read == nil { log.violation("no final read of \(key) within 30 s") }
        }
        let checker = LinearizabilityChecker(model: RegisterModel())
        let histories = registers.all
        log.figure("register histories", "\(histories.count)")
        var slowest: (Duration, String) = (.zero, "")
        for (key, history) in histories.sorted(by: { $0.key < $1.key }) {
            let started = ContinuousClock.now
            let history = RegisterModel.resolveUnknowns(history)
            let result = checker.check(history)
            let took = ContinuousClock.now - started
            let unknown = history.filter { $0.output == nil }.count
            if took > slowest.0 { slowest = (took, "\(key): \(history.count) operations, \(unknown) of unknown outcome") }
            if case .undecided(let explored) = result {
                log.violation("\(key) could not be checked: the search gave up after \(explored) states (\(history.count) operations, \(unknown) of unknown outcome)")
            }
            if case .violation(let placed, let stuck) = result {
                let window = describe(stuck, of: history)
                log.violation(
                    "\(key) is not linearizable: \(placed) of \(history.count) operations placed; none of these could come next:\n    "
                        + window.joined(separator: "\n    "))
            }
        }
        slowestCheck = "\(slowest.0) for \(slowest.1)"
        // A host that leaves takes its subtree with it, names included: a history is only checked if a membership
        // query that returned before its first call and one called after its last answer both saw its host alive
        // in the same session (a departure ends the session; a session never comes back).
        let nameChecker = LinearizabilityChecker(model: NameModel())
        let queries = sessionsSeen.withLock { $0 }
        let nameHistories = names.withLock { $0 }.filter { path, history in
            let host = String(path.dropFirst().prefix { $0 != "/" })
            let firstCall = history.map(\.call).min() ?? 0
            let lastAnswer = history.compactMap(\.returned).max() ?? firstCall
            let before = queries.filter { $0.returned <= firstCall }.max { $0.returned < $1.returned }
            let after = queries.filter { $0.call >= lastAnswer }.min { $0.call < $1.call }
            guard let session = before?.alive[host] else { return false }
            return after?.alive[host] == session
        }
        log.figure("name histories", "\(nameHistories.count) checked of \(names.withLock { $0.count }) (for the others no query showed their host alive in one session throughout)")
        for (path, history) in nameHistories.sorted(by: { $0.key < $1.key }) {
            switch nameChecker.check(history) {
            case .linearizable: break
            case .undecided(let explored): log.violation("\(path) could not be checked: the search gave up after \(explored) states")
            case .violation(let placed, let stuck):
                let window = describe(stuck, of: history)
                log.violation("the name \(path) is not linearizable: \(placed) of \(history.count) placed; none of these could come next:\n    " + window.joined(separator: "\n    "))
            }
        }
        // 2. Every acknowledged sequential create is there with its value (and none was named twice: as they came).
        // Eight reads at a time (a soak acknowledges tens of thousands).
        let acknowledged = sequential.withLock { $0 }.sorted { $0.key < $1.key }
        let batchReader = reader
        for batch in stride(from: 0, to: acknowledged.count, by: 8).map({ acknowledged[$0..<min($0 + 8, acknowledged.count)] }) {
            await withTaskGroup(of: Void.self) { group in
                for (name, value) in batch {
                    group.addTask {
                        var got: String??
                        _ = try? await eventually("a read of \(name)", timeout: .seconds(30)) {
                            got = await Self.read(batchReader, name)
                            return got != nil
                        }
                        if got != .some(value) {
                            self.log.violation(
                                "acknowledged sequential create \(name) = \(value) reads back as \(got.map { $0 ?? "absent" } ?? "no answer in 30 s")")
                        }
                    }
                }
            }
        }
        log.figure("acknowledged sequential names read back", "\(acknowledged.count)")
        // 3. No ephemeral record was seen after its session's TTL plus the bound, counted from the last keep-alive or
        // from the last fault healed (a new leader gives every session a full TTL), and every one is gone by now.
        var goneAfter: [Int64] = []
        for (path, seen) in ephemerals.withLock({ $0 }) {
            for read in seen.reads {
                let from = max(seen.lastKeepAlive, log.lastDisturbance(atOrBefore: read.call) ?? 0)
                let late = Int64(read.call) - Int64(from) - Int64((ChaosSettings.sessionTTL + ChaosSettings.expiryBound) * 1_000_000)
                if !read.present && read.call > from { goneAfter.append((Int64(read.call) - Int64(from)) / 1_000_000) }
                if late > 0 && read.present {
                    log.violation("\(path) was still there \(late / 1_000_000) ms past its session's TTL plus \(ChaosSettings.expiryBound) ms (read at \(log.seconds(read.call)))")
                }
            }
            let gone: Void? = try? await eventually("\(path) to expire", timeout: .seconds(30)) {
                await Self.read(reader, path) == .some(nil)
            }
            if gone == nil { log.violation("\(path) outlived its session by over 30 s after healing") }
        }
        goneAfter.sort()
        log.figure(
            "ephemerals expired", "\(goneAfter.count), found gone \(goneAfter.first ?? 0) to \(goneAfter.last ?? 0) ms after the last keep-alive or fault (bound \(ChaosSettings.sessionTTL + ChaosSettings.expiryBound) ms)")
        // 4. Every membership watcher saw the same events in the same order: wherever two saw a revision, they saw
        // the same events, and each saw every revision any saw, from where they all began to the last event.
        let seen = membership.withLock { $0 }
        // Each watcher's events by revision (a revision may carry several, e.g. a host that leaves and rejoins).
        var union: [UInt64: [EventView]] = [:]
        for (w, events) in seen.enumerated() {
            for (a, b) in zip(events, events.dropFirst()) where a.revision > b.revision {
                log.violation("membership watcher \(w) saw revision \(b.revision) after \(a.revision)")
            }
            for (revision, those) in Dictionary(grouping: events, by: \.revision) {
                if let other = union[revision], other != those {
                    log.violation("membership watchers disagree at revision \(revision): \(other) vs \(those)")
                }
                union[revision] = those
            }
        }
        for (w, events) in seen.enumerated() {
            let mine = Set(events.map(\.revision))
            for r in union.keys.sorted() where r <= lastEvent && !mine.contains(r) {
                log.violation("membership watcher \(w) never saw revision \(r) (\(union[r]!))")
            }
        }
        if union.isEmpty && !log.faultCounts.isEmpty { log.violation("the membership watchers saw no event through the faults") }
        log.figure("membership events seen", "\(union.values.map(\.count).reduce(0, +)) in \(union.count) revisions (by \(seen.map { "\($0.count)" }.joined(separator: ", ")))")
        // 5. Every replica's applied state is byte-identical once they have applied the same index.
        try await replicasAgree()
        let violations = log.violations
        if !violations.isEmpty {
            Issue.record(
                """
                chaos found \(violations.count) violation(s) (seed \(seed), mode: \(mode)); replay the nemesis's choices with CHAOS_SEED=\(seed)
                \(violations.joined(separator: "\n"))
                the nemesis's schedule:
                \(log.schedule)
                """)
        }
    }

    /// The operations at `indexes`, one per line: client, input, answer, and when it was called and returned.
    func describe<Input, Output>(_ indexes: [Int], of history: [Operation<Input, Output>]) -> [String] {
        indexes.map { history[$0] }.map { op in
            "client \(op.client): \(op.input) -> \(op.output.map { "\($0)" } ?? "unknown") [\(log.seconds(op.call)) … \(op.returned.map(log.seconds) ?? "never")]"
        }
    }

    /// A record's value (`.some(nil)`: absent), or nil if the cluster did not answer.
    static func read(_ client: CircuitClient, _ path: String) async -> String?? {
        do {
            return .some(try await client.get(path).value)
        } catch .api(let e) where e.code == "not_found" {
            return .some(nil)
        } catch {
            return nil
        }
    }

    func replicasAgree() async throws {
        var snapshots: [UInt64: [Int: [UInt8]]] = [:]
        let agreed: Void? = try? await eventually("every replica's state at one applied index", timeout: .seconds(30)) {
            for i in self.cluster.members.indices {
                var c = self.cluster.client(i)
                c.timeout = 2
                guard let bytes = try? await c.stateSnapshot(), let state = try? ControlState(restoring: bytes) else { continue }
                snapshots[state.appliedIndex, default: [:]][i] = bytes
            }
            return snapshots.values.contains { $0.count == self.cluster.members.count }
        }
        guard agreed != nil else {
            log.violation("the replicas did not reach one applied index within 30 s: \(snapshots.mapValues { $0.keys.sorted() })")
            return
        }
        for (index, byMember) in snapshots.sorted(by: { $0.key < $1.key }) where Set(byMember.values).count > 1 {
            log.violation("replicas differ at applied index \(index): \(byMember.mapValues(\.count)) bytes")
        }
        let common = snapshots.filter { $0.value.count == cluster.members.count }.keys.max() ?? 0
        log.figure("replicas byte-identical at applied index", "\(common)")
    }

    func report() {
        print(
            """
            chaos summary (seed \(seed), \(ChaosSettings.seconds) s of nemesis, mode: \(mode))
              operations: \(log.operations)
              faults: \(log.faultCounts)
              \(log.figures)
              violations: \(log.violations.count)
              recovered \(recovery) after healing; checked in \(checkTime) (the slowest history: \(slowestCheck))
            """)
    }
}

/// Each register's history, as the clients saw it.
final class Histories: Sendable {
    typealias Op = Operation<RegisterModel.Input, RegisterModel.Output>
    private let byKey = Mutex<[String: [Op]]>([:])
    func add(_ key: String, _ op: Op) { byKey.withLock { $0[key, default: []].append(op) } }
    var all: [String: [Op]] { byKey.withLock { $0 } }
}
